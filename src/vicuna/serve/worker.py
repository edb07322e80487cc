"""A model worker: one engine behind HTTP, registered with a controller.

Generation streams as newline-delimited JSON :class:`~vicuna.serve.core.Delta`
objects; errors found before the first delta get a real HTTP status (so the
front end can retry elsewhere or answer 4xx), errors after it a final
``{"error": {...}}`` line. A client that goes away aborts its sequence.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import InvalidRequest, ModelNotFound, ServeError, error_response
from .core import GenerateRequest, bearer_ok, check_unicode
from .engine.base import served
from .metrics import Metrics
from .model_client import tokenize_response

log = logging.getLogger(__name__)


class _Body(BaseModel):
    # strict types; unknown fields ignored: front ends of another version may send more
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class GenerateBody(_Body):
    model: str | None = None
    request: dict[str, Any]


class CountBody(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


class EmbedBody(_Body):
    model: str | None = None
    input: list[str]


class TokenizeBody(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[int]


class Heartbeater:
    """Registers with the controller, then reports the queue length every ``interval`` seconds."""

    def __init__(self, controller: str, address: str, engine, *, secret: str | None = None, interval: float = 5.0):
        import httpx

        self.controller, self.address, self.engine, self.interval = controller.rstrip("/"), address, engine, interval
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.http = httpx.Client(headers=headers, timeout=5.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")
        self.registered = threading.Event()

    def start(self) -> "Heartbeater":
        self._thread.start()
        return self

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        if deregister:
            try:
                self.http.post(self.controller + "/remove_worker", json={"worker_address": self.address})
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.http.close()

    def _register(self) -> None:
        r = self.http.post(self.controller + "/register_worker", json={
            "worker_address": self.address, "models": list(served(self.engine)),
            "queue_length": self.engine.queue_length, "info": self.engine.info()})
        if r.status_code == 401:
            log.error("the controller refused our secret; set the same --secret / VICUNA_SECRET everywhere")
        r.raise_for_status()
        self.registered.set()
        log.info("registered %s with %s", self.address, self.controller)

    def _loop(self) -> None:
        import httpx

        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    self._register()
                else:
                    r = self.http.post(self.controller + "/receive_heartbeat", json={
                        "worker_address": self.address, "queue_length": self.engine.queue_length})
                    r.raise_for_status()
                    if not r.json().get("exist", False):
                        self.registered.clear()
                        continue
            except httpx.HTTPError as e:
                log.warning("controller %s unreachable (%s); retrying", self.controller, e)
            self._stop.wait(self.interval if self.registered.is_set() else min(self.interval, 1.0))


def create_worker_app(engine, *, secret: str | None = None) -> FastAPI:
    app = FastAPI(title=f"vicuna worker ({engine.name})", docs_url=None, redoc_url=None)
    metrics = Metrics(lambda: {engine.name: engine})

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if secret and request.url.path not in ("/health", "/metrics"):
            if not bearer_ok(request.headers.get("authorization"), [secret]):
                return error_response(ServeError("missing or wrong worker secret", status=401,
                                                 code="invalid_secret"))
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(InvalidRequest(f"invalid worker request: {where or 'body'}: {first.get('msg')}",
                                             param=where or None))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ServeError(f"internal worker error: {type(exc).__name__}", status=500))

    def check_model(model: str | None):
        """The engine, or the LoRA adapter view, serving ``model`` (None: the worker's own model)."""
        table = served(engine)
        if model is None:
            return engine
        if model not in table:
            raise ModelNotFound.for_model(model, list(table))
        return table[model]

    @app.post("/worker_generate_stream")
    async def generate_stream(body: GenerateBody):
        target = check_model(body.model)
        request = GenerateRequest.from_wire(body.request)
        stream = target.generate(request)
        try:
            first = await stream.__anext__()  # validation / overload errors become statuses
        except BaseException:
            await stream.aclose()
            raise

        async def lines():
            try:
                yield json.dumps(first.to_dict()) + "\n"
                if first.finish_reason:
                    return
                async for delta in stream:
                    yield json.dumps(delta.to_dict()) + "\n"
            except ServeError as e:
                body_ = e.to_dict()
                body_["error"]["status"] = e.status
                yield json.dumps(body_) + "\n"
            finally:
                await stream.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/count_token")
    async def count_token(body: CountBody):
        check_model(body.model)
        if body.messages is not None:
            ids, _ = engine.prepare(GenerateRequest(messages=body.messages, max_tokens=1))
            return {"count": len(ids), "error_code": 0}
        return {"count": engine.count_tokens(body.prompt or ""), "error_code": 0}

    @app.post("/worker_tokenize")
    async def tokenize(body: TokenizeBody):
        check_model(body.model)
        return tokenize_response(engine, **body.model_dump(exclude={"model"}))

    @app.post("/worker_detokenize")
    async def detokenize(body: DetokenizeBody):
        check_model(body.model)
        return {"prompt": engine.detokenize(body.tokens)}

    @app.post("/worker_get_conv_template")
    @app.get("/worker_get_conv_template")
    async def conv_template():
        t = engine.template
        describe = getattr(t, "describe", None)
        return {"conv": describe() if describe else {"name": getattr(t, "name", "jinja")}}

    @app.post("/model_details")
    @app.get("/model_details")
    async def model_details():
        return engine.info()

    @app.post("/worker_get_embeddings")
    async def embeddings(body: EmbedBody):
        target = check_model(body.model)
        vectors, tokens = await target.embed(body.input)
        return {"embeddings": vectors, "token_num": tokens}

    @app.post("/worker_get_status")
    @app.get("/worker_get_status")
    async def status():
        s = engine.stats()
        return {"model_names": list(served(engine)), "queue_length": engine.queue_length, "waiting": s.waiting,
                "running": s.running, "requests_finished": s.requests_finished,
                "requests_aborted": s.requests_aborted, "tokens_per_second": s.tokens_per_second, "speed": 1}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    return app
