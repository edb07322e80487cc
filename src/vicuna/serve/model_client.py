"""The one interface every front end talks to: :class:`ModelClient`.

The OpenAI API, the web UI and the arena do not care whether the model runs in
this process (:class:`LocalClient`, the single-machine default) or on workers
behind a controller (:class:`ControllerClient`); both give the same methods and
raise the same :class:`ServeError` subclasses, so ``vicuna serve --model-path P``
and ``vicuna serve api --controller URL`` run exactly the same front-end code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from ..errors import InvalidRequest, ModelNotFound, ServeError, Unavailable
from ..generation import MAX_SEED
from .core import Delta, GenerateRequest

__all__ = ["GenerateRequest", "Delta", "Embeddings", "ModelClient", "LocalClient", "ControllerClient"]

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

    def choices(self, model: str, request: GenerateRequest, n: int) -> list[AsyncIterator[Delta]]: ...

    def describe(self, model: str) -> dict[str, Any] | None: ...

    async def embed(self, model: str, inputs: list[str]) -> Embeddings: ...

    # vLLM's /tokenize and /detokenize: {count, max_model_len, tokens[, token_strs]} and {prompt}
    async def tokenize(self, model: str, **how) -> dict[str, Any]: ...

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def tokenize_response(engine, *, prompt: str | None = None, messages: list[dict] | None = None,
                      add_special_tokens: bool | None = None, add_generation_prompt: bool = True,
                      return_token_strs: bool = False) -> dict[str, Any]:
    """``/tokenize``'s answer from an engine (here or on a worker)."""
    ids = engine.tokenize(prompt=prompt, messages=messages, add_special_tokens=add_special_tokens,
                          add_generation_prompt=add_generation_prompt)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    if return_token_strs:
        out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
    return out


def choice_request(base: GenerateRequest, i: int) -> GenerateRequest:
    """Choice ``i`` of ``n``: a distinct but reproducible seed when one is given."""
    if i == 0 or base.seed is None:
        return base
    return dataclasses.replace(base, seed=(base.seed + i) % (MAX_SEED + 1))


class _ClientBase:
    """``stream_chat`` (text deltas only, for UIs) and ``choices`` on top of ``generate``."""

    def choices(self, model: str, request: GenerateRequest, n: int) -> list[AsyncIterator[Delta]]:
        """``n`` answers to one request, one stream each: here ``n`` generations, seeded ``seed + i``
        (an upstream that samples ``n`` itself gets one request, see :mod:`vicuna.serve.endpoint`)."""
        return [self.generate(model, choice_request(request, i)) for i in range(n)]

    def describe(self, model: str) -> dict[str, Any] | None:
        """Where ``model`` is served, when it is not by our own engine (an endpoint: its upstream model)."""
        return None

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

    async def tokenize(self, model: str, **how) -> dict[str, Any]:
        raise InvalidRequest(f"/tokenize is not available for {model!r} here", param="model")

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]:
        raise InvalidRequest(f"/detokenize is not available for {model!r} here", param="model")

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

    async def tokenize(self, model: str, **how) -> dict[str, Any]:
        return tokenize_response(self._tokenizing(model), **how)

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]:
        return {"prompt": self._tokenizing(model).detokenize(tokens)}

    def _tokenizing(self, model: str):
        engine = self._engine(model)
        if getattr(engine, "tokenizer", None) is None:  # an endpoint: its tokenizer is the upstream's
            raise InvalidRequest(f"{model!r} is served by an upstream endpoint; its tokenizer is not here",
                                 param="model")
        return engine

    # runtime LoRA adapters (POST /v1/load_lora_adapter, /v1/unload_lora_adapter)
    async def load_lora_adapter(self, name: str, path: str, base: str | None = None) -> None:
        """Load the adapter at ``path`` onto a base served here and serve it as model ``name``."""
        from ..errors import InvalidRequest

        if not name or name in self.engines:
            raise InvalidRequest(f"a model named {name!r} is already served; unload it first or pick another "
                                 "lora_name", param="lora_name")
        bases = {n: e for n, e in self.engines.items()
                 if hasattr(e, "load_adapter") and getattr(e, "base_engine", None) is None}
        if base is not None:
            if base not in bases:
                raise InvalidRequest(f"base_model_name {base!r} is not a model here that takes LoRA adapters "
                                     f"(these do: {', '.join(bases) or 'none'})", param="base_model_name")
            engine = bases[base]
        elif len(bases) == 1:
            engine = next(iter(bases.values()))
        else:
            raise InvalidRequest(f"{len(bases)} models here take LoRA adapters ({', '.join(bases) or 'none'}); "
                                 "say which with base_model_name", param="base_model_name")
        self.engines[name] = await engine.load_adapter(name, path)

    def unload_lora_adapter(self, name: str) -> None:
        view = self.engines.get(name)
        if getattr(view, "base_engine", None) is None:
            adapters = [n for n, e in self.engines.items() if getattr(e, "base_engine", None) is not None]
            raise ModelNotFound(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(adapters) or 'none'})",
                                param="lora_name")
        view.base_engine.unload_adapter(name)
        del self.engines[name]

    async def close(self) -> None:
        for engine in self.engines.values():
            engine.stop()


class WorkerHung(ServeError):
    """A worker that stopped answering: silent past a timeout, and its /health too (SIGSTOP, a wedged loop)."""

    status = 504
    code = "worker_timeout"


class ControllerClient(_ClientBase):
    """Models served by workers registered with a controller (``vicuna serve api --controller URL``).

    The controller picks a worker (shortest queue); the stream then flows
    straight from the worker. A worker that fails before the response starts is
    excluded and the request retried on another; one that fails mid-stream
    ends the stream with a :class:`ServeError` (the front end turns it into an
    error event rather than hanging).

    A hung worker is noticed too: when no response starts within
    ``first_byte_timeout`` seconds, or no line comes within ``chunk_timeout``,
    the worker's ``/health`` gets ``probe_timeout`` seconds to answer. A worker
    that answers is busy (a long queue), and the wait goes on; one that does not
    is hung: it is avoided for ``avoid_for`` seconds (the controller drops it once
    its heartbeats stop) and the request is retried elsewhere if it had not
    started, or ends with an error if it had.
    """

    def __init__(self, controller_url: str, secret: str | None = None, *, max_attempts: int = 3,
                 first_byte_timeout: float = 10.0, chunk_timeout: float = 10.0, probe_timeout: float = 5.0,
                 controller_timeout: float = 10.0, avoid_for: float = 30.0):
        import httpx

        self.controller_url = controller_url.rstrip("/")
        self.secret = secret
        self.max_attempts = max_attempts
        self.first_byte_timeout, self.chunk_timeout = first_byte_timeout, chunk_timeout
        self.probe_timeout, self.controller_timeout, self.avoid_for = probe_timeout, controller_timeout, avoid_for
        self._hung: dict[str, float] = {}  # worker address -> until when it is avoided (monotonic)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        # No read timeout on worker traffic: silence is judged by _wait (busy or hung?), not by httpx.
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=5.0))

    async def _controller(self, path: str, payload: dict | None = None) -> dict:
        import httpx

        url = self.controller_url + path
        try:
            r = await (self.http.post(url, json=payload, timeout=self.controller_timeout) if payload is not None
                       else self.http.get(url, timeout=self.controller_timeout))
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

    def hung_workers(self) -> list[str]:
        """Workers avoided now because they stopped answering."""
        now = time.monotonic()
        return [a for a, until in self._hung.items() if until > now]

    async def _worker_for(self, model: str, exclude: list[str]) -> str:
        found = await self._controller("/get_worker_address",
                                       {"model": model, "exclude": [*exclude, *self.hung_workers()]})
        address = found.get("address") or ""
        if address:
            return address
        if found.get("endpoint"):  # an upstream the controller serves itself (`serve controller --endpoints`)
            return self.controller_url + found["endpoint"]
        if found.get("endpoint_down"):
            raise Unavailable(f"the endpoint serving {model!r} is down; retry later", retry_after=10)
        models = found.get("models")
        if found.get("warming_up"):  # a restarted controller: the workers are re-registering
            raise Unavailable(f"no worker for model {model!r} yet: the controller has just started and its "
                              "workers are registering; retry shortly", retry_after=2)
        if found.get("registered") is True:  # it had workers; none is alive now: retry, not "no such model"
            raise Unavailable(f"model {model!r} has no live worker right now (its workers stopped sending "
                              "heartbeats); retry later", retry_after=found.get("retry_after") or 5)
        if models is not None and model not in models:
            raise ModelNotFound.for_model(model, list(models))
        raise Unavailable(f"no live worker for model {model!r} right now; retry shortly", retry_after=2)

    async def _wait(self, awaitable, timeout: float, address: str):
        """``awaitable``'s result; while it is silent for ``timeout`` s, the worker must show it is alive."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if done:
                    return task.result()
                if not await self._alive(address):
                    self._hung[address] = time.monotonic() + self.avoid_for
                    log.warning("worker %s stopped responding (silent for %g s, /health unanswered); avoiding it "
                                "for %g s", address, timeout, self.avoid_for)
                    raise WorkerHung(f"worker {address} stopped responding (no output for {timeout:g} s and no "
                                     f"answer to /health within {self.probe_timeout:g} s)")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _alive(self, address: str) -> bool:
        import httpx

        try:
            r = await self.http.get(address + "/health", timeout=self.probe_timeout)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

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
            if address in exclude:  # the only one there is (an endpoint the controller serves) just failed
                raise last
            started = False
            r = None
            try:
                req = self.http.build_request("POST", address + "/worker_generate_stream",
                                              json={"model": model, "request": request.to_dict()})
                r = await self._wait(self.http.send(req, stream=True), self.first_byte_timeout, address)
                if r.status_code != 200:
                    body = await self._wait(r.aread(), self.chunk_timeout, address)
                    err = _error_from(body, r.status_code, r.headers.get("retry-after"))
                    if r.status_code in (429, 503):  # that worker is full: try another one
                        exclude.append(address)
                        last = err
                        continue
                    raise err
                started = True
                lines = r.aiter_lines()
                while True:
                    try:
                        line = await self._wait(lines.__anext__(), self.chunk_timeout, address)
                    except StopAsyncIteration:
                        break
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
            except WorkerHung as e:
                if started:
                    raise
                exclude.append(address)
                last = Unavailable(e.message, retry_after=1)
            except httpx.HTTPError as e:
                if started:
                    raise ServeError(f"worker {address} failed mid-stream: {type(e).__name__}: {e}",
                                     status=502, code="worker_failed") from None
                log.warning("worker %s failed before responding (%s); retrying on another", address, e)
                exclude.append(address)
                last = Unavailable(f"worker {address} failed: {e}", retry_after=1)
            finally:
                if r is not None:
                    await r.aclose()
        raise last or Unavailable(f"no worker could serve {model!r}", retry_after=2)

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        body = await self._worker_call(model, "/worker_get_embeddings", {"model": model, "input": inputs})
        return Embeddings(body["embeddings"], int(body["token_num"]))

    async def tokenize(self, model: str, **how) -> dict[str, Any]:
        return await self._worker_call(model, "/worker_tokenize", {"model": model, **how})

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]:
        return await self._worker_call(model, "/worker_detokenize", {"model": model, "tokens": tokens})

    async def _worker_call(self, model: str, path: str, payload: dict) -> dict:
        """A short JSON call to a worker of ``model`` (another one if it fails to answer)."""
        import httpx

        exclude: list[str] = []
        last: ServeError | None = None
        for _ in range(self.max_attempts):
            address = await self._worker_for(model, exclude)
            try:
                r = await self._wait(self.http.post(address + path, json=payload), self.first_byte_timeout, address)
            except (httpx.HTTPError, WorkerHung) as e:
                exclude.append(address)
                last = Unavailable(f"worker {address} failed: {e}", retry_after=1)
                continue
            if r.status_code != 200:
                raise _error_from(r.content, r.status_code, r.headers.get("retry-after"))
            return r.json()
        raise last or Unavailable(f"no worker could serve {model!r}", retry_after=2)

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
