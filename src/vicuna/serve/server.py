"""Running an ASGI app with uvicorn: in the foreground (CLI) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A port free this moment; another process may take it before it is bound (prefer binding port 0)."""
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
    """Serve ``app`` in the foreground; once listening, print ``listening on http://HOST:PORT`` with the port
    bound, so with port 0 (the OS picks a free one) a script or test learns where to connect (uvicorn logs it
    only at log level info)."""
    import uvicorn

    class AnnouncedServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print(f"listening on {_url(host, self.servers[0].sockets[0].getsockname()[1])}", flush=True)

    AnnouncedServer(_config(app, host, port, log_level, trusted_proxies)).run()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """Uvicorn serving ``app`` in a daemon thread; ``with ServerThread(app) as url: ...``.

    ``start`` binds the socket itself, in the caller's thread: the port (by default one the OS picks, which
    nobody can take between choosing and binding) is known at once, and a port already in use raises
    OSError(EADDRINUSE) to the caller rather than ending the thread with a log line.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 trusted_proxies: list[str] | None = None):
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(_config(app, host, port, log_level, trusted_proxies))
        self.server.install_signal_handlers = lambda: None  # only the main thread may install them
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def start(self, timeout: float = 30.0) -> str:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
