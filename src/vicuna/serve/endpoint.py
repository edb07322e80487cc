"""OpenAI-compatible upstreams as models: vLLM/SGLang/TGI/llama.cpp servers and hosted APIs.

An endpoints file (``--endpoints FILE.yaml``) lists them; each becomes a model beside our own
engines' or workers' — listed in ``/v1/models``, routable by name, playable in the arena —
through :class:`EndpointClient`, which speaks the same :class:`~vicuna.serve.model_client.ModelClient`
interface as our engines and workers. :class:`RoutedClient` puts both behind one client.

What we do and what the upstream does: the upstream renders the prompt with its own template,
batches and samples; we pass the request through (streaming, ``n`` in one request, stop, seed,
logprobs; usage comes back from the upstream), bound the requests in flight per endpoint
(``max_concurrency``: excess waits ``queue_timeout`` seconds for a slot, then 429), check its
health (a down endpoint's model answers 503, the others keep serving), and turn its failures into
our errors: an HTTP status before the answer starts, an error event after (a timeout or a dropped
connection mid-stream never hangs the client).

API keys come only from environment variables (``api_key_env``) and are never stored, logged,
echoed in an error or shown to the browser: upstream error texts pass through with the key
blanked, and an upstream that refuses the key gets our own message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..conversation import message_text
from ..errors import InvalidRequest, ModelNotFound, Overloaded, ServeError, Unavailable, UsageError
from .model_client import Embeddings, _ClientBase
from . import structured
from .tools import new_call_id
from .core import Delta, GenerateRequest

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 10.0  # seconds between health checks of each endpoint


class EndpointEntry(BaseModel):
    """One entry of the endpoints file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the model name clients use here")
    api_base: str = Field(pattern=r"^https?://\S+$", description="the upstream's OpenAI base URL, e.g. "
                                                                  "http://vllm:8000/v1")
    model: str | None = Field(None, min_length=1, description="the upstream's model name (default: name)")
    api_key_env: str | None = Field(None, min_length=1, description="environment variable holding its API key")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once; more wait, then 429")
    timeout: float = Field(60.0, gt=0, description="seconds of upstream silence (connect, first byte, between "
                                                   "chunks) before the request fails")
    queue_timeout: float = Field(30.0, ge=0, description="seconds a request beyond max_concurrency waits for "
                                                         "a slot before it is refused with 429")
    text_only: bool = Field(True, description="send message content as plain text (false: pass content "
                                              "parts such as images through)")

    @field_validator("api_base")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.rstrip("/")

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


def load_endpoints(path: str | os.PathLike) -> list[EndpointEntry]:
    """The endpoints of a YAML file: a list of entries, or ``{"endpoints": [...]}``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read the endpoints file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"endpoints"}:
        data = data["endpoints"]
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: expected a non-empty list of endpoints "
                         "({name, api_base, model, api_key_env, max_concurrency, timeout, text_only})")
    endpoints = []
    for i, entry in enumerate(data):
        where = f"{path}: endpoint {i + 1}"
        if isinstance(entry, dict) and "api_key" in entry:
            raise UsageError(f"{where}: keys are not read from files; put the key in an environment variable "
                             "and name it with api_key_env")
        try:
            endpoints.append(EndpointEntry.model_validate(entry))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "entry"
            raise UsageError(f"{where}: {field}: {first['msg']}") from None
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: two endpoints are named {next(n for n in names if names.count(n) > 1)!r}")
    return endpoints


@dataclass
class EndpointsConfig:
    """`--endpoints FILE.yaml`: OpenAI-compatible upstreams served beside our own models."""

    endpoints: str | None = field(default=None, metadata={
        "metavar": "FILE.yaml", "help": "OpenAI-compatible upstreams to serve as models beside ours: a YAML list "
        "of {name, api_base, model, api_key_env, max_concurrency, timeout, queue_timeout, text_only} (see "
        "docs/serving.md); API keys come from the environment variables named by api_key_env"})

    def wrap(self, base: Any | None) -> Any:
        """``base`` (our engines, a controller's workers, or None) with the endpoints beside it."""
        if not self.endpoints:
            return base
        return RoutedClient(EndpointClient(load_endpoints(self.endpoints)), base)


class _Upstream:
    """One endpoint at run time: its key, its concurrency slots and its health."""

    def __init__(self, endpoint: EndpointEntry, environ: Mapping[str, str]):
        self.endpoint = endpoint
        self.key = None
        if endpoint.api_key_env:
            self.key = environ.get(endpoint.api_key_env) or None
            if self.key is None:
                raise UsageError(f"endpoint {endpoint.name!r}: the environment variable {endpoint.api_key_env} "
                                 "(its api_key_env) is not set")
        self.slots = asyncio.Semaphore(endpoint.max_concurrency)
        self.down_since: float | None = None
        self.why_down = ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def mark_down(self, why: str) -> None:
        if self.down_since is None:
            log.warning("endpoint %s is down: %s", self.endpoint.name, self.redact(why))
            self.down_since = time.monotonic()
        self.why_down = self.redact(why)

    def mark_up(self) -> None:
        if self.down_since is not None:
            log.info("endpoint %s is up again", self.endpoint.name)
        self.down_since = None


class EndpointClient(_ClientBase):
    """The models of an endpoints file, as a :class:`~vicuna.serve.model_client.ModelClient`."""

    def __init__(self, endpoints: list[EndpointEntry], *, environ: Mapping[str, str] | None = None,
                 health_interval: float = HEALTH_INTERVAL):
        import httpx

        environ = os.environ if environ is None else environ
        self.upstreams = {e.name: _Upstream(e, environ) for e in endpoints}
        self.health_interval = health_interval
        slots = sum(e.max_concurrency for e in endpoints) + len(endpoints)  # + a health check each
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots))
        self._health: asyncio.Task | None = None

    @property
    def names(self) -> list[str]:
        return list(self.upstreams)

    # -- health ------------------------------------------------------------------------

    def _watch(self) -> None:
        """Start the health checks on the running loop (the client is built before the server's loop runs)."""
        if self._health is None or self._health.done():
            self._health = asyncio.get_running_loop().create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._check(u) for u in self.upstreams.values()))
            await asyncio.sleep(self.health_interval)

    async def _check(self, u: _Upstream) -> None:
        import httpx

        try:
            r = await self.http.get(u.endpoint.api_base + "/models", headers=u.headers(),
                                    timeout=min(u.endpoint.timeout, 10.0))
        except httpx.HTTPError as e:
            u.mark_down(f"{type(e).__name__}: {e}")
            return
        if r.status_code >= 500:
            u.mark_down(f"GET /models answered {r.status_code}")
        else:  # 4xx: it is up (a proxy without /models, a key only for completions): requests will tell
            u.mark_up()

    async def list_models(self) -> list[str]:
        """The endpoints that are up (a down one answers 503 by name, and battles leave it out)."""
        self._watch()
        return [name for name, u in self.upstreams.items() if u.down_since is None]

    def _upstream(self, model: str) -> _Upstream:
        u = self.upstreams.get(model)
        if u is None:
            raise ModelNotFound.for_model(model, self.names)
        if u.down_since is not None:
            raise Unavailable(f"the endpoint serving {model!r} is down ({u.why_down}); retry later",
                              retry_after=self.health_interval)
        return u

    def describe(self, model: str) -> dict[str, Any] | None:
        u = self.upstreams.get(model)
        return None if u is None else {"served_by": "endpoint", "upstream_model": u.endpoint.upstream_model}

    # -- generation --------------------------------------------------------------------

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self.choices(model, request, 1)[0]

    def choices(self, model: str, request: GenerateRequest, n: int) -> list[AsyncIterator[Delta]]:
        """``n`` answers from one upstream request (``n`` passed through, as the upstream samples them)."""
        if request.prompt_logprobs is not None:  # an OpenAI-compatible upstream need not score prompts
            raise InvalidRequest(f"prompt logprobs (echo with logprobs, prompt_logprobs) are not served for "
                                 f"{model!r}, an upstream endpoint", param="prompt_logprobs")
        self._watch()
        call = _Call(self, model, request, n)
        return [call.stream(i) for i in range(n)]

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        import httpx

        u = self._upstream(model)
        async with _slot(u):
            try:
                r = await self.http.post(u.endpoint.api_base + "/embeddings", headers=u.headers(),
                                         json={"model": u.endpoint.upstream_model, "input": inputs},
                                         timeout=u.endpoint.timeout)
            except httpx.HTTPError as e:
                raise _transport_error(u, e, started=False) from None
        if r.status_code != 200:
            raise _status_error(u, r.status_code, r.content, r.headers.get("retry-after"))
        body = r.json()
        vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d.get("index", 0))]
        return Embeddings(vectors, int((body.get("usage") or {}).get("prompt_tokens", 0)))

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        await self.http.aclose()


class _slot:
    """A concurrency slot of an endpoint: wait up to its queue_timeout, then 429."""

    def __init__(self, u: _Upstream):
        self.u = u

    async def __aenter__(self):
        e = self.u.endpoint
        try:
            await asyncio.wait_for(self.u.slots.acquire(), timeout=e.queue_timeout)
        except TimeoutError:
            raise Overloaded(f"endpoint {e.name!r} is busy: {e.max_concurrency} requests in flight (its "
                             "max_concurrency); retry shortly", retry_after=max(1.0, e.queue_timeout)) from None

    async def __aexit__(self, *exc):
        self.u.slots.release()


def _upstream_body(u: _Upstream, request: GenerateRequest, n: int) -> tuple[str, dict[str, Any]]:
    """The upstream's path and JSON body for ``request``: only what the client set is passed on."""
    chat = request.messages is not None
    body: dict[str, Any] = {"model": u.endpoint.upstream_model, "stream": True,
                            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [_message(u, i, m) for i, m in enumerate(request.messages)]
    else:
        body["prompt"] = request.prompt
    for name in ("temperature", "top_p", "max_tokens", "seed", "top_k", "repetition_penalty"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension
    if n != 1:
        body["n"] = n
    if request.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": request.logprobs} if chat else {"logprobs": request.logprobs})
    if request.tools and request.tool_choice:  # the upstream decides, with its own template, and returns its calls
        body.update(tools=request.tools, tool_choice=request.tool_choice)
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    body.update(structured.openai_fields(request.constraint))  # a forced tool call arrives as constrained JSON
    return ("/chat/completions" if chat else "/completions"), body


def _message(u: _Upstream, i: int, m: dict) -> dict:
    if not u.endpoint.text_only or isinstance(m.get("content"), (str, type(None))):
        return m
    parts = m["content"]
    if any(not isinstance(p, dict) or p.get("type") != "text" for p in parts):
        raise InvalidRequest(f"model {u.endpoint.name!r} takes text only; messages[{i}].content has other parts",
                             param=f"messages[{i}].content")
    return {**m, "content": message_text(parts)}


def _chat_logprobs(lp: dict | None) -> list[dict] | None:
    if not lp or lp.get("content") is None:
        return None
    return [{"token": e["token"], "logprob": e["logprob"],
             "top": [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []]} for e in lp["content"]]


def _completion_logprobs(lp: dict | None) -> list[dict] | None:
    if not lp or not lp.get("tokens"):
        return None
    tops = lp.get("top_logprobs") or [{}] * len(lp["tokens"])
    return [{"token": t, "logprob": v, "top": list((top or {}).items())}
            for t, v, top in zip(lp["tokens"], lp["token_logprobs"], tops)]


class _Call:
    """One upstream request answering ``n`` choices: one reader task, one queue per choice.

    Each choice's final delta is held back until the upstream's answer is complete, so it can
    carry the usage the upstream reports last (prompt tokens; all completion tokens on choice 0,
    which is what sums to the upstream's total).
    """

    def __init__(self, client: EndpointClient, model: str, request: GenerateRequest, n: int):
        self.client, self.model, self.request, self.n = client, model, request, n
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(n)]
        self.task: asyncio.Task | None = None
        self.open = n

    async def stream(self, i: int) -> AsyncIterator[Delta]:
        if self.task is None:
            self.task = asyncio.create_task(self._read())
        try:
            while True:
                item = await self.queues[i].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            self.open -= 1
            if not self.open and not self.task.done():  # every consumer went away: abort upstream
                self.task.cancel()

    def _put_all(self, item) -> None:
        for q in self.queues:
            q.put_nowait(item)

    async def _read(self) -> None:
        try:
            u = self.client._upstream(self.model)
            path, body = _upstream_body(u, self.request, self.n)
            async with _slot(u):
                await self._exchange(u, path, body)
        except asyncio.CancelledError:
            raise
        except ServeError as e:
            self._put_all(e)
        except Exception as e:  # noqa: BLE001 - reported to every choice, never a hang
            log.exception("endpoint %s: unexpected failure", self.model)
            self._put_all(ServeError(f"endpoint {self.model!r} failed: {type(e).__name__}", status=502,
                                     code="upstream_error"))

    async def _exchange(self, u: _Upstream, path: str, body: dict) -> None:
        import httpx

        e = u.endpoint
        timeout = httpx.Timeout(e.timeout, connect=min(e.timeout, 10.0))
        chat, started = "messages" in body, False
        finish: list[str | None] = [None] * self.n
        tokens = [0] * self.n  # content chunks per choice: the usage when the upstream reports none
        calls: list[dict[int, dict]] = [{} for _ in range(self.n)]  # per choice: tool-call index -> the call so far
        usage: dict = {}
        try:
            async with self.client.http.stream("POST", e.api_base + path, json=body, headers=u.headers(),
                                               timeout=timeout) as r:
                if r.status_code != 200:
                    raise _status_error(u, r.status_code, await r.aread(), r.headers.get("retry-after"))
                u.mark_up()
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _mid_stream_error(u, chunk["error"])
                    usage = chunk.get("usage") or usage
                    for c in chunk.get("choices") or []:
                        i = int(c.get("index", 0))
                        if not 0 <= i < self.n:
                            continue
                        delta = c.get("delta") or {}
                        text = (delta.get("content") if chat else c.get("text")) or ""
                        for piece in (delta.get("tool_calls") or []) if chat else ():
                            started = True
                            _add_call_piece(calls[i], piece)
                        lps = (_chat_logprobs if chat else _completion_logprobs)(c.get("logprobs"))
                        if text or lps:
                            started = True
                            tokens[i] += 1
                            self.queues[i].put_nowait(Delta(text, None, logprobs=lps))
                        finish[i] = c.get("finish_reason") or finish[i]
        except httpx.HTTPError as err:
            raise _transport_error(u, err, started=started) from None
        except ValueError as err:  # a chunk that is not JSON
            raise ServeError(f"endpoint {e.name!r} sent a malformed stream ({err})", status=502,
                             code="upstream_error") from None
        if not all(finish):
            raise ServeError(f"endpoint {e.name!r} closed the stream before the answer finished", status=502,
                             code="upstream_error")
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", sum(tokens)))
        for i, reason in enumerate(finish):
            made = [calls[i][k] for k in sorted(calls[i])] or None
            self.queues[i].put_nowait(Delta("", reason, prompt, completion if i == 0 else 0, tool_calls=made))


def _add_call_piece(calls: dict[int, dict], piece: dict) -> None:
    """Accumulate one streamed tool-call delta (the id and name first, then argument pieces) into ``calls``."""
    fn = piece.get("function") or {}
    call = calls.setdefault(int(piece.get("index", len(calls))), {
        "id": piece.get("id") or new_call_id(), "type": "function", "function": {"name": "", "arguments": ""}})
    call["function"]["name"] += fn.get("name") or ""
    call["function"]["arguments"] += fn.get("arguments") or ""


def _status_error(u: _Upstream, status: int, body: bytes, retry_after: str | None) -> ServeError:
    """An upstream's refusal as our error with the right status (its key never in the message)."""
    name = u.endpoint.name
    try:
        err = json.loads(body).get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        err, message = {}, body.decode(errors="replace")[:300]
    message = u.redact(str(message or f"HTTP {status}"))
    try:
        retry = float(retry_after) if retry_after else None
    except ValueError:
        retry = None
    if status in (401, 403):
        return ServeError(f"endpoint {name!r} refused our credentials (HTTP {status}); check its api_key_env",
                          status=502, code="upstream_auth_failed")
    if status == 404:
        return ServeError(f"endpoint {name!r} does not serve {u.endpoint.upstream_model!r}: {message}", status=502,
                          code="upstream_model_not_found")
    if status == 429:
        return Overloaded(f"endpoint {name!r} is rate limited: {message}", retry_after=retry or 1)
    if status in (400, 413, 422):
        param, code = (err.get("param"), err.get("code")) if isinstance(err, dict) else (None, None)
        if code is None and "context" in message.lower() and "length" in message.lower():
            code = "context_length_exceeded"  # an upstream that says so only in words
        return InvalidRequest(f"{name}: {message}", param=param, code=code)
    if status == 503:
        return Unavailable(f"endpoint {name!r} is unavailable: {message}", retry_after=retry or 5)
    return ServeError(f"endpoint {name!r} failed (HTTP {status}): {message}", status=502, code="upstream_error")


def _mid_stream_error(u: _Upstream, err: Any) -> ServeError:
    message = err.get("message") if isinstance(err, dict) else str(err)
    return ServeError(f"endpoint {u.endpoint.name!r} failed mid-answer: {u.redact(str(message))}", status=502,
                      code="upstream_error")


def _transport_error(u: _Upstream, err: Exception, *, started: bool) -> ServeError:
    import httpx

    name, what = u.endpoint.name, u.redact(f"{type(err).__name__}: {err}")
    if not started and isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
        u.mark_down(what)
        return Unavailable(f"cannot reach endpoint {name!r} ({what}); retry later", retry_after=5)
    if isinstance(err, httpx.TimeoutException):
        return ServeError(f"endpoint {name!r} sent nothing for {u.endpoint.timeout:g} s ({what})", status=504,
                          code="upstream_timeout")
    return ServeError(f"endpoint {name!r} dropped the connection{' mid-answer' if started else ''} ({what})",
                      status=502, code="upstream_error")


class EndpointEngine:
    """One endpoint as the engine of a worker app: how a controller (`vicuna serve controller
    --endpoints FILE`) serves it to its front ends, which then reach it like any worker."""

    backend = "endpoint"
    template = None

    def __init__(self, client: EndpointClient, name: str):
        self.client, self.name = client, name
        self.upstream = client.upstreams[name]

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self.client.generate(self.name, request)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        result = await self.client.embed(self.name, texts)
        return result.vectors, result.prompt_tokens

    def prepare(self, request: GenerateRequest):
        raise InvalidRequest(f"{self.name} is an endpoint: its tokenizer is the upstream's, not counted here")

    count_tokens = prepare

    @property
    def queue_length(self) -> int:  # requests holding or waiting for one of its slots
        slots = self.upstream.slots
        return self.upstream.endpoint.max_concurrency - slots._value + len(slots._waiters or ())

    def stats(self):
        from .engine import EngineStats

        return EngineStats(running=self.queue_length)

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "backend": self.backend, **self.client.describe(self.name)}


class RoutedClient(_ClientBase):
    """One ModelClient over the endpoints and our own models (engines in this process, or a controller's
    workers): an endpoint's name routes to it, any other to ``base``. With no ``base``, the endpoints only
    (`vicuna serve api --endpoints FILE` needs no controller)."""

    def __init__(self, endpoints: EndpointClient, base: Any | None = None):
        self.endpoints, self.base = endpoints, base
        self.engines = getattr(base, "engines", None)  # the engine gauges of /metrics

    def _for(self, model: str):
        if model in self.endpoints.upstreams or self.base is None:
            return self.endpoints
        return self.base

    async def list_models(self) -> list[str]:
        ours = await self.base.list_models() if self.base is not None else []
        shadowed = set(ours) & set(self.endpoints.names)
        if shadowed:
            log.warning("models %s are both endpoints and ours; the endpoints answer", sorted(shadowed))
        return [m for m in ours if m not in shadowed] + await self.endpoints.list_models()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self._for(model).generate(model, request)

    def choices(self, model: str, request: GenerateRequest, n: int) -> list[AsyncIterator[Delta]]:
        return self._for(model).choices(model, request, n)

    def describe(self, model: str) -> dict[str, Any] | None:
        return self._for(model).describe(model)

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        return await self._for(model).embed(model, inputs)

    async def tokenize(self, model: str, **how) -> dict[str, Any]:
        return await self._for(model).tokenize(model, **how)

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]:
        return await self._for(model).detokenize(model, tokens)

    async def close(self) -> None:
        await self.endpoints.close()
        if self.base is not None:
            await self.base.close()
