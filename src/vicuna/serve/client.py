"""The one interface every front end talks to: :class:`ModelClient`.

The OpenAI API, the web UI and the arena do not care whether the model runs in
this process (:class:`LocalClient`, the single-machine default) or on workers
behind a controller (:class:`ControllerClient`); both give the same methods and
raise the same :class:`ServeError` subclasses, so ``vicuna serve --model-path P``
and ``vicuna serve api --controller URL`` run exactly the same front-end code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from .core import (
    AuthError, ContextLengthExceeded, Delta, GenerateRequest, InvalidRequest, ModelNotFound, Overloaded,
    ServeError, Unavailable,
)

__all__ = [
    "ServeError", "InvalidRequest", "ContextLengthExceeded", "AuthError", "ModelNotFound", "Overloaded",
    "Unavailable", "GenerateRequest", "Delta", "Embeddings", "ModelClient", "LocalClient", "ControllerClient",
]

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@runtime_checkable
class ModelClient(Protocol):
    async def list_models(self) -> list[str]: ...

    async def stream_chat(self, model: str, messages: list[dict], *, temperature: float | None = None,
                          top_p: float | None = None,
                          max_tokens: int | None = None, stop: list[str] | None = None, seed: int | None = None
                          ) -> AsyncIterator[str]: ...

    # Richer calls the OpenAI front end needs (usage, finish reasons, logprobs, embeddings).
    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]: ...

    async def embed(self, model: str, inputs: list[str]) -> Embeddings: ...

    async def close(self) -> None: ...


class _ClientBase:
    """``stream_chat`` (text deltas only, for UIs) on top of ``generate``."""

    async def stream_chat(self, model: str, messages: list[dict], *, temperature: float | None = None,
                          top_p: float | None = None,
                          max_tokens: int | None = None, stop: list[str] | None = None, seed: int | None = None
                          ) -> AsyncIterator[str]:
        req = GenerateRequest(messages=messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                              stop=list(stop or []), seed=seed)
        stream = self.generate(model, req)
        try:
            async for delta in stream:
                if delta.text:
                    yield delta.text
        finally:
            await stream.aclose()

    async def close(self) -> None:
        return None


class LocalClient(_ClientBase):
    """Models served by engines in this process (``vicuna serve --model-path P``)."""

    def __init__(self, engines: dict[str, Any]):
        self.engines = dict(engines)

    async def list_models(self) -> list[str]:
        return list(self.engines)

    def _engine(self, model: str):
        engine = self.engines.get(model)
        if engine is None:
            raise ModelNotFound.for_model(model, list(self.engines))
        return engine

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]:
        engine = self._engine(model)
        stream = engine.generate(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # a client that went away aborts its sequence in the engine

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        vectors, tokens = await self._engine(model).embed(inputs)
        return Embeddings(vectors, tokens)

    async def model_info(self, model: str) -> dict[str, Any]:
        return self._engine(model).info()

    async def close(self) -> None:
        for engine in self.engines.values():
            engine.stop()


class ControllerClient(_ClientBase):
    """Models served by workers registered with a controller (``vicuna serve api --controller URL``).

    The controller picks a worker (shortest queue); the stream then flows
    straight from the worker. A worker that fails before the response starts is
    excluded and the request retried on another; one that fails mid-stream
    ends the stream with a :class:`ServeError` (the front end turns it into an
    error event rather than hanging).
    """

    def __init__(self, controller_url: str, secret: str | None = None, *, timeout: float = 600.0,
                 max_attempts: int = 3):
        import httpx

        self.controller_url = controller_url.rstrip("/")
        self.secret = secret
        self.max_attempts = max_attempts
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))

    async def _controller(self, path: str, payload: dict | None = None) -> dict:
        import httpx

        url = self.controller_url + path
        try:
            r = await (self.http.post(url, json=payload) if payload is not None else self.http.get(url))
        except httpx.HTTPError as e:
            raise Unavailable(f"cannot reach the controller at {self.controller_url}: {e}", retry_after=5) from None
        if r.status_code == 401:
            raise ServeError("the controller refused our secret (set the same --secret on every component)",
                             status=500, code="controller_auth_failed")
        if r.status_code != 200:
            raise ServeError(f"controller {path} answered {r.status_code}: {r.text[:200]}", status=502)
        return r.json()

    async def list_models(self) -> list[str]:
        return list((await self._controller("/list_models"))["models"])

    async def _worker_for(self, model: str, exclude: list[str]) -> str:
        found = await self._controller("/get_worker_address", {"model": model, "exclude": exclude})
        address = found.get("address") or ""
        if address:
            return address
        models = found.get("models")
        if models is not None and model not in models:
            raise ModelNotFound.for_model(model, list(models))
        raise Unavailable(f"no live worker for model {model!r} right now; retry shortly", retry_after=2)

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]:
        import httpx

        exclude: list[str] = []
        last: ServeError | None = None
        for _ in range(self.max_attempts):
            try:
                address = await self._worker_for(model, exclude)
            except Unavailable:
                if last is not None:
                    raise last from None
                raise
            started = False
            try:
                async with self.http.stream("POST", address + "/worker_generate_stream",
                                            json={"model": model, "request": request.to_dict()}) as r:
                    if r.status_code != 200:
                        body = await r.aread()
                        err = _error_from(body, r.status_code, r.headers.get("retry-after"))
                        if r.status_code in (429, 503):  # that worker is full: try another one
                            exclude.append(address)
                            last = err
                            continue
                        raise err
                    started = True
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if "error" in item:
                            raise _error_from(item, int(item["error"].get("status") or 500), None)
                        delta = Delta.from_dict(item)
                        yield delta
                        if delta.finish_reason:
                            return
                    raise ServeError(f"worker {address} closed the stream before it finished",
                                     status=502, code="worker_failed")
            except httpx.HTTPError as e:
                if started:
                    raise ServeError(f"worker {address} failed mid-stream: {type(e).__name__}: {e}",
                                     status=502, code="worker_failed") from None
                log.warning("worker %s failed before responding (%s); retrying on another", address, e)
                exclude.append(address)
                last = Unavailable(f"worker {address} failed: {e}", retry_after=1)
        raise last or Unavailable(f"no worker could serve {model!r}", retry_after=2)

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        import httpx

        exclude: list[str] = []
        last: ServeError | None = None
        for _ in range(self.max_attempts):
            address = await self._worker_for(model, exclude)
            try:
                r = await self.http.post(address + "/worker_get_embeddings", json={"model": model, "input": inputs})
            except httpx.HTTPError as e:
                exclude.append(address)
                last = Unavailable(f"worker {address} failed: {e}", retry_after=1)
                continue
            if r.status_code != 200:
                raise _error_from(r.content, r.status_code, r.headers.get("retry-after"))
            body = r.json()
            return Embeddings(body["embeddings"], int(body["token_num"]))
        raise last or Unavailable(f"no worker could serve {model!r}", retry_after=2)

    async def model_info(self, model: str) -> dict[str, Any]:
        address = await self._worker_for(model, [])
        r = await self.http.post(address + "/model_details", json={"model": model})
        return r.json()

    async def close(self) -> None:
        await self.http.aclose()


def _error_from(body: bytes | dict, status: int, retry_after: str | None) -> ServeError:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            body = {"error": {"message": body.decode(errors="replace")[:300]}}
    try:
        ra = float(retry_after) if retry_after else None
    except ValueError:
        ra = None
    return ServeError.from_dict(body, status, ra)
