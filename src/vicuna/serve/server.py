"""Running an ASGI app with uvicorn: in the foreground (CLI) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(app, host: str, port: int, log_level: str, trusted_proxies: list[str] | None = None):
    import uvicorn

    # lifespan on: Gradio starts its queue there; timeout_keep_alive > client idle keeps connections reused.
    # X-Forwarded-For is believed only from --trusted-proxies (uvicorn's own default trusts 127.0.0.1,
    # so any local process could pose as any client and dodge per-client limits).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_keep_alive=30,
                          access_log=False, proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=list(trusted_proxies or []))


def run_server(app, host: str, port: int, log_level: str = "info", *, trusted_proxies: list[str] | None = None
               ) -> None:
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level, trusted_proxies)).run()


class ServerThread:
    """Uvicorn serving ``app`` in a daemon thread; ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 trusted_proxies: list[str] | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(_config(app, self.host, self.port, log_level, trusted_proxies))
        self.server.install_signal_handlers = lambda: None  # only the main thread may install them
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
