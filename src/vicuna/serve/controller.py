"""The controller: a registry of model workers and a dispatcher.

Workers register and then send a heartbeat with their queue length every few
seconds; a worker silent for ``heartbeat_expiry`` seconds is treated as dead
(lookups skip it at once, a sweeper deletes it). Front ends ask for a worker
address per request and get the live worker for that model with the shortest
queue. Generation traffic flows from worker to front end directly, so the
controller is never a bottleneck for tokens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..errors import InvalidRequest, ServeError, error_response
from .core import bearer_ok

log = logging.getLogger(__name__)


class _Body(BaseModel):
    # strict: a queue length of "0" is a 400 naming it, not silently an int
    model_config = ConfigDict(extra="ignore", strict=True)


# What a worker may claim. A negative queue length would win every dispatch, an address that is not
# a URL would be handed to front ends, an empty model list would register nothing.
Address = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2048)]
QueueLength = Annotated[int, Field(ge=0, le=1_000_000)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RegisterWorker(_Body):
    worker_address: Address
    models: Annotated[list[ModelName], Field(min_length=1, max_length=64)]
    queue_length: QueueLength = 0
    info: dict[str, Any] = {}


class Heartbeat(_Body):
    worker_address: Address
    queue_length: QueueLength = 0


class WorkerAddress(_Body):
    worker_address: str


class GetWorker(_Body):
    model: str
    exclude: list[str] = []


@dataclass
class WorkerState:
    address: str
    models: list[str]
    queue_length: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Live workers; every read filters out the ones past their heartbeat expiry."""

    def __init__(self, heartbeat_expiry: float = 15.0):
        self.expiry = heartbeat_expiry
        self.workers: dict[str, WorkerState] = {}
        # every model a worker registered since start: one with no live worker now is "unavailable" (503,
        # retry), not "no such model" (404, which clients do not retry)
        self.registered: set[str] = set()

    def live(self) -> list[WorkerState]:
        now = time.monotonic()
        return [w for w in self.workers.values() if now - w.last_heartbeat <= self.expiry]

    def sweep(self) -> list[str]:
        now = time.monotonic()
        dead = [a for a, w in self.workers.items() if now - w.last_heartbeat > self.expiry]
        for a in dead:
            log.warning("worker %s missed its heartbeats for %.0f s: dropped", a, self.expiry)
            del self.workers[a]
        return dead

    def models(self) -> list[str]:
        return sorted({m for w in self.live() for m in w.models})

    def pick(self, model: str, exclude: list[str]) -> str:
        """Shortest queue wins (ties broken at random); the pick counts as queued until the next heartbeat."""
        candidates = [w for w in self.live() if model in w.models and w.address not in exclude]
        if not candidates:
            return ""
        shortest = min(w.queue_length for w in candidates)
        chosen = random.choice([w for w in candidates if w.queue_length == shortest])
        chosen.queue_length += 1
        return chosen.address


def create_controller_app(*, secret: str | None = None, heartbeat_expiry: float = 15.0, endpoints=None) -> FastAPI:
    """The controller; with ``endpoints`` (an EndpointClient) it also serves those upstreams as models,
    each through a worker app of its own under ``/endpoints/N``, so front ends need no endpoints file
    and no keys (the keys are in this process's environment)."""
    registry = Registry(heartbeat_expiry)

    async def sweeper():
        while True:
            await asyncio.sleep(max(0.2, heartbeat_expiry / 3))
            registry.sweep()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(sweeper())
        yield
        task.cancel()

    app = FastAPI(title="vicuna controller", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.registry = registry
    started = time.monotonic()

    def warming_up() -> bool:
        """Just (re)started: live workers may not have re-registered yet (they do on their next beat)."""
        return time.monotonic() - started < heartbeat_expiry

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(InvalidRequest(f"invalid {request.url.path} request: {param or 'body'}: "
                                             f"{first.get('msg')}", param=param))

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if secret and request.url.path != "/health":
            if not bearer_ok(request.headers.get("authorization"), [secret]):
                return error_response(ServeError("missing or wrong controller secret", status=401,
                                                 code="invalid_secret"))
        return await call_next(request)

    @app.post("/register_worker")
    async def register(body: RegisterWorker):
        registry.workers[body.worker_address] = WorkerState(body.worker_address, body.models, body.queue_length,
                                                            info=body.info)
        registry.registered.update(body.models)
        log.info("registered worker %s for %s", body.worker_address, ", ".join(body.models))
        return {"ok": True}

    @app.post("/receive_heartbeat")
    async def heartbeat(body: Heartbeat):
        w = registry.workers.get(body.worker_address)
        if w is None:
            return {"exist": False}  # the worker re-registers (e.g. after a controller restart)
        w.queue_length, w.last_heartbeat = body.queue_length, time.monotonic()
        return {"exist": True}

    @app.post("/remove_worker")
    async def remove(body: WorkerAddress):
        return {"removed": registry.workers.pop(body.worker_address, None) is not None}

    routes = {}  # endpoint name -> the path of its worker app
    if endpoints is not None:
        from .endpoint import EndpointEngine
        from .worker import create_worker_app

        for i, name in enumerate(endpoints.names):
            routes[name] = f"/endpoints/{i}"
            app.mount(routes[name], create_worker_app(EndpointEngine(endpoints, name), secret=secret))

    async def all_models() -> list[str]:
        ours = registry.models()
        return ours + [m for m in (await endpoints.list_models() if endpoints else []) if m not in ours]

    @app.get("/list_models")
    @app.post("/list_models")
    async def list_models():
        return {"models": await all_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(body: GetWorker):
        if body.model in routes:  # an endpoint's name is the endpoint's (as for front ends with the file)
            up = body.model in await endpoints.list_models()
            return {"address": "", "endpoint": routes[body.model] if up else None, "endpoint_down": not up,
                    "models": await all_models()}
        return {"address": registry.pick(body.model, body.exclude), "models": await all_models(),
                "warming_up": warming_up(), "registered": body.model in registry.registered,
                "retry_after": max(1.0, heartbeat_expiry / 3)}

    @app.get("/workers")
    async def workers():
        now = time.monotonic()
        return {"workers": [{"address": w.address, "models": w.models, "queue_length": w.queue_length,
                             "seconds_since_heartbeat": round(now - w.last_heartbeat, 2), "info": w.info}
                            for w in registry.live()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(registry.live())}

    @app.get("/metrics")
    async def metrics():
        lines = ["# HELP vicuna_controller_workers Live workers", "# TYPE vicuna_controller_workers gauge",
                 f"vicuna_controller_workers {len(registry.live())}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
