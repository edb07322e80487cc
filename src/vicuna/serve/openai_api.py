"""The OpenAI-compatible REST API, built on any :class:`~vicuna.serve.model_client.ModelClient`.

``create_app(LocalClient(...))`` serves models in this process;
``create_app(ControllerClient(url))`` serves the models of a controller's
workers — the same routes, the same error handling. The web UI mounts itself
into the returned app (define routes first, then ``gr.mount_gradio_app``).

Errors always have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``; anything raised before the first byte of a stream becomes a proper
HTTP status, anything after it a ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import InvalidRequest, ModelNotFound, ServeError, error_response
from . import protocol as P
from . import tools as T
from .core import Delta, GenerateRequest, bearer_ok, merge_streams
from .metrics import Metrics
from .model_client import ModelClient

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_N = 8
# What --api-keys protects: the API and its description (the schema names every route and field).
# /health and /metrics stay open for probes; a mounted web UI is NOT guarded by them (docs/serving.md).
KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize", "/openapi.json", "/docs", "/redoc")
UNAUTHENTICATED = "unauthenticated"  # the one metrics label of every request refused for its key


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _event_stream(events) -> StreamingResponse:
    """An SSE response that proxies pass through unbuffered (nginx honours X-Accel-Buffering)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Guard:
    """ASGI middleware: body size limit, API keys on /v1 (and the schema), request counts by status.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through
    untouched and a client disconnect still reaches the route.
    """

    def __init__(self, app, *, max_body_bytes: int, api_keys: list[str] | None, metrics: Metrics):
        self.app = app
        self.max_body = max_body_bytes
        self.keys = [k for k in (api_keys or []) if k]
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = None  # the metrics label: the route's template, never the raw path (bounded series)
        status_seen: list[int] = []

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        async def reply(err: ServeError):
            await error_response(err)(scope, receive, send_counted)

        try:
            if self.keys and path.startswith(KEYED_PATHS) and not self._authorized(scope):
                endpoint = UNAUTHENTICATED
                return await reply(ServeError(
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY' (one of --api-keys).",
                    status=401, code="invalid_api_key"))
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return await reply(self._too_large(int(length)))
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:  # chunked bodies without Content-Length
                        raise HTTPException(413, self._too_large(received).message)
                return message

            await self.app(scope, limited_receive, send_counted)
        finally:
            self.metrics.requests.labels(endpoint or _route_label(scope),
                                         str(status_seen[0] if status_seen else 499)).inc()

    def _authorized(self, scope) -> bool:
        return bearer_ok(dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1"), self.keys)

    def _too_large(self, size: int) -> ServeError:
        return ServeError(f"request body of {size} bytes exceeds the limit of {self.max_body} bytes",
                          status=413, code="request_too_large")


def _route_label(scope) -> str:
    """The template of the route that served the request (Starlette leaves it in the scope): /v1/models/{model}
    for every model id, the catch-all for every unknown /v1 path, the mount for the web UI."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "other"
    return path or "/"


def _validation_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[str]", "list[dict[str,any]]", "int", "float", "bool") or "[" in str(p):
            break  # pydantic's union branch names, not a field
        else:
            out += ("." if out else "") + str(p)
    return out or None


def _body_problem(request: Request, *, empty: bool) -> str:
    """Why the body is not a request object, and what to send instead."""
    ctype = request.headers.get("content-type", "")
    if empty:
        return ("the request body is empty; send a JSON object such as "
                '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}')
    if ctype and "json" not in ctype:
        return (f"the request body must be a JSON object sent as Content-Type: application/json, not {ctype!r} "
                "(with curl: -H 'Content-Type: application/json')")
    return "the request body must be a JSON object"


class _Usage:
    """Token counts of ``k`` choices (``n`` per prompt), from each one's final delta: an upstream
    endpoint knows them only at the end of its answer."""

    def __init__(self, k: int, n: int):
        self.n, self.prompt, self.completion = n, [0] * k, [0] * k

    def finish(self, i: int, delta: Delta) -> None:
        self.prompt[i], self.completion[i] = delta.prompt_tokens, delta.completion_tokens

    @property
    def prompt_tokens(self) -> int:  # the n choices of a prompt share it
        return sum(self.prompt[::self.n])

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion)

    def as_dict(self) -> dict[str, int]:
        return P.usage(self.prompt_tokens, self.completion_tokens)


def create_app(client: ModelClient, *, api_keys: list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = DEFAULT_MAX_N, engines: dict | None = None,
               title: str = "vicuna OpenAI-compatible API", lora_manager=None,
               tool_parser: str | None = None) -> FastAPI:
    """The API app. ``engines`` (default: a LocalClient's) feed the engine gauges in /metrics; ``lora_manager``
    (a :class:`~vicuna.serve.model_client.LocalClient`) serves runtime LoRA loading, off without one;
    ``tool_parser`` (one of :data:`vicuna.serve.tools.PARSERS`) fixes how tool calls are read from text (default:
    by format)."""
    if tool_parser is not None and tool_parser not in T.PARSERS:
        raise ValueError(f"unknown tool parser {tool_parser!r}; use one of {', '.join(T.PARSERS)}")
    if engines is None:
        engines = getattr(client, "engines", None)
    metrics = Metrics((lambda: engines) if engines is not None else None)
    # strict_content_type off: a JSON body sent without Content-Type (curl -d ... without -H) is read as JSON
    app = FastAPI(title=title, docs_url=None, redoc_url=None, strict_content_type=False)
    app.state.client = client
    app.state.metrics = metrics
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, api_keys=api_keys, metrics=metrics)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        if err.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, err.status, err.message)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(InvalidRequest(
                f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"))
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("missing", "model_attributes_type"):
            return error_response(InvalidRequest(_body_problem(request, empty=first["type"] == "missing")))
        param = _validation_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":  # as OpenAI words it
            return error_response(InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param,
                                                 code="unrecognized_argument"))
        if first.get("type") == "missing":
            msg = f"missing required parameter {param!r}"
        elif param:
            msg = f"invalid value for {param!r}: {msg}"
        return error_response(InvalidRequest(msg, param=param))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # OpenAI's words; FastAPI's are "Not Found"
            message = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else
                       f"Method {request.method} is not allowed on {request.url.path}")
        response = error_response(ServeError(message, status=exc.status_code, code=code))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ServeError(f"internal server error: {type(exc).__name__}", status=500))

    def check_n(n: int) -> int:
        if not 1 <= n <= max_n:
            raise InvalidRequest(f"n must be between 1 and {max_n}, got {n}", param="n")
        return n

    async def open_streams(model: str, requests: list[GenerateRequest], n: int):
        """Start ``n`` choices of every request and wait for each one's first delta, so validation,
        unknown model, context length and back-pressure errors become HTTP statuses before any byte is sent."""
        streams = [s for r in requests for s in client.choices(model, r, n)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            if isinstance(errors[0], StopAsyncIteration):
                raise ServeError("the model produced no output", status=500)
            raise errors[0]
        return streams, firsts

    async def merged(model: str, streams, firsts, started: float) -> AsyncIterator[tuple[int, Delta]]:
        """Interleave the choices' deltas as they come; cancelling this cancels every choice."""
        if len(streams) == 1:  # the common case: no tasks, no extra queue hop per token
            stream, first_text = streams[0], True
            try:
                item = firsts[0]
                while True:
                    if first_text and item.text:
                        metrics.ttft.labels(model).observe(time.perf_counter() - started)
                        first_text = False
                    yield 0, item
                    if item.finish_reason:
                        return
                    item = await stream.__anext__()
            finally:
                await stream.aclose()
                metrics.latency.labels(model).observe(time.perf_counter() - started)
            return
        pending, first_text = len(streams), True
        try:
            async for i, item, error in merge_streams([_prepend(f, s) for s, f in zip(streams, firsts)]):
                if error is not None:
                    raise error
                if item is None:
                    continue
                if first_text and item.text:
                    metrics.ttft.labels(model).observe(time.perf_counter() - started)
                    first_text = False
                if item.finish_reason:
                    pending -= 1
                yield i, item
                if not pending:
                    return
        finally:
            metrics.latency.labels(model).observe(time.perf_counter() - started)

    async def unless_disconnected(request: Request, work) -> None:
        """Run a non-streaming generation; abort it if the client goes away meanwhile
        (streaming responses get this from Starlette, plain ones do not)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise ServeError("client disconnected", status=499, code="client_closed_request")
        finally:
            if not task.done():
                task.cancel()

    async def error_event(err: Exception) -> str:
        if not isinstance(err, ServeError):
            log.exception("stream failed", exc_info=err)
            err = ServeError(f"internal server error: {type(err).__name__}", status=500)
        return _sse(err.to_dict())

    def account(model: str, used: _Usage) -> None:
        metrics.prompt_tokens.labels(model).inc(used.prompt_tokens)
        metrics.completion_tokens.labels(model).inc(used.completion_tokens)

    async def stream_events(model: str, deltas: AsyncIterator[tuple[int, Delta]], used: _Usage,
                            chunks: Callable[[int, Delta], Iterator[str]],
                            usage_chunk: Callable[[], str] | None) -> AsyncIterator[str]:
        """The tail chat and text completions share: each delta's SSE chunks, its usage once it finishes; once
        the stream has started an error is reported in-band (the status is sent); the usage chunk, [DONE]."""
        try:
            async for i, d in deltas:
                for chunk in chunks(i, d):
                    yield chunk
                if d.finish_reason:
                    used.finish(i, d)
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield await error_event(e)
            yield "data: [DONE]\n\n"
            return
        account(model, used)
        if usage_chunk is not None:
            yield usage_chunk()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        try:
            models = await client.list_models()
        except ServeError as e:
            return JSONResponse({"status": "unavailable", "error": e.message}, status_code=503)
        return {"status": "ok", "models": models}

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def list_models():
        return P.model_list(await client.list_models())

    @app.get("/v1/models/{model:path}")  # :path: model names may hold slashes (org/name)
    async def retrieve_model(model: str):
        names = await client.list_models()
        if model not in names:
            raise ModelNotFound.for_model(model, names)
        return P.model_card(model)

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        model = await _model_or_only(body.model)
        messages = [m.as_dict() for m in body.messages] if body.messages is not None else None
        return await client.tokenize(model, prompt=body.prompt, messages=messages,
                                     add_special_tokens=body.add_special_tokens,
                                     add_generation_prompt=body.add_generation_prompt,
                                     return_token_strs=body.return_token_strs)

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        return await client.detokenize(await _model_or_only(body.model), body.tokens)

    async def _model_or_only(model: str | None) -> str:
        """vLLM's tokenizer routes may leave out the model when one is served."""
        if model is not None:
            return model
        names = await client.list_models()
        if len(names) != 1:
            raise InvalidRequest(f"name the model: this server has {len(names)} ({', '.join(names)})",
                                 param="model")
        return names[0]

    def _lora_manager():
        if lora_manager is None:
            raise ServeError("this server does not load LoRA adapters at runtime: start it with "
                             "--allow-runtime-lora (in-process hf/vllm models), or give --lora NAME=PATH at start",
                             status=404, code="runtime_lora_disabled")
        return lora_manager

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: P.LoadLoraAdapterRequest):
        """vLLM's runtime adapter loading: the adapter is then served as model ``lora_name``."""
        await _lora_manager().load_lora_adapter(body.lora_name, body.lora_path, body.base_model_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: P.UnloadLoraAdapterRequest):
        _lora_manager().unload_lora_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        started = time.perf_counter()
        base = body.to_generate()
        n = check_n(body.n)
        streams, firsts = await open_streams(body.model, [base], n)
        rid, model, used = P.new_id("chatcmpl"), body.model, _Usage(n, n)
        plan = body.tool_plan
        if not body.stream:
            texts, reasons, lps = [[] for _ in range(n)], [None] * n, [None] * n
            made: list[list[dict]] = [[] for _ in range(n)]  # calls an upstream endpoint made itself
            if base.logprobs is not None:
                lps = [[] for _ in range(n)]

            async def collect():
                async for i, d in merged(model, streams, firsts, started):
                    texts[i].append(d.text)
                    made[i].extend(d.tool_calls or [])
                    if d.logprobs:
                        lps[i].extend(d.logprobs)
                    if d.finish_reason:
                        reasons[i] = d.finish_reason
                        used.finish(i, d)

            await unless_disconnected(request, collect())
            account(model, used)
            answers = [("".join(t), r, lp) for t, r, lp in zip(texts, reasons, lps)]
            if plan.parses:  # tool calls out of the text (or the constrained JSON of a forced call)
                answers = [(c, fr, lp, calls) for (t, r, lp) in answers
                           for c, calls, fr in [T.complete(t, r, plan, tool_parser)]]
                answers = [(c if not m else (c or "").strip() or None, T.finish_reason(fr, True) if m else fr, lp,
                            (calls or []) + m or None) for (c, fr, lp, calls), m in zip(answers, made)]
            return P.chat_completion(rid, model, answers, used.prompt_tokens, used.completion_tokens)

        with_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            created = P.now()
            tool_streams = [T.ToolStream(plan, tool_parser) for _ in range(n)] if plan.parses else None

            def tool_chunks(i: int, d: Delta) -> Iterator[str]:
                s = tool_streams[i]
                text, calls = s.feed(d.text)
                if d.finish_reason:
                    rest, more = s.finish()
                    text, calls = text + rest, calls + more
                if d.tool_calls:  # an upstream endpoint's own calls, after any parsed from the text
                    s.calls += d.tool_calls
                    calls = calls + [{"index": len(s.calls) - len(d.tool_calls) + k, **c}
                                     for k, c in enumerate(d.tool_calls)]
                body_ = {"content": text} if text else {}
                if calls:
                    body_["tool_calls"] = calls
                if body_ or d.logprobs:
                    yield _sse(P.chat_chunk(rid, model, created, [{
                        "index": i, "delta": body_, "finish_reason": None,
                        "logprobs": P.chat_logprobs(d.logprobs) if d.logprobs is not None else None}],
                        with_usage=with_usage))
                if d.finish_reason:
                    yield _sse(P.chat_chunk(rid, model, created, [P.chat_choice_delta(
                        i, Delta("", T.finish_reason(d.finish_reason, s.called())))], with_usage=with_usage))

            def chunks(i: int, d: Delta) -> Iterator[str]:
                if tool_streams is not None:
                    yield from tool_chunks(i, d)
                    return
                if d.text or d.logprobs:
                    yield _sse(P.chat_chunk(rid, model, created, [P.chat_choice_delta(
                        i, Delta(d.text, None, logprobs=d.logprobs))], with_usage=with_usage))
                if d.finish_reason:
                    yield _sse(P.chat_chunk(rid, model, created, [P.chat_choice_delta(
                        i, Delta("", d.finish_reason))], with_usage=with_usage))

            yield _sse(P.chat_chunk(rid, model, created, [P.chat_choice_delta(i, role=True) for i in range(n)],
                                    with_usage=with_usage))
            async for event in stream_events(
                    model, merged(model, streams, firsts, started), used, chunks,
                    (lambda: _sse(P.chat_chunk(rid, model, created, [], used.as_dict(), True))) if with_usage else None):
                yield event

        return _event_stream(events())

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        started = time.perf_counter()
        prompts = body.prompts()
        n = check_n(body.n)
        if len(prompts) * n > max_n * 4:
            raise InvalidRequest(f"at most {max_n * 4} completions per request (prompts x n)", param="prompt")
        streams, firsts = await open_streams(body.model, [body.to_generate(p) for p in prompts], n)
        rid, model, k = P.new_id("cmpl"), body.model, len(prompts) * n
        used = _Usage(k, n)
        echo = [prompts[i // n] if body.echo else "" for i in range(k)]
        # the prompt's own logprobs came with each choice's first delta (computed in its prefill)
        prompt_lps = [f.prompt_logprobs or [] for f in firsts]
        echo_lps = [prompt_lps[i] if body.echo else [] for i in range(k)]
        vllm_lps = [P.vllm_prompt_logprobs(p) if body.prompt_logprobs is not None else None for p in prompt_lps]
        if not body.stream:
            texts, reasons, lps = [[e] for e in echo], [None] * k, [list(e) for e in echo_lps]

            async def collect():
                async for i, d in merged(model, streams, firsts, started):
                    texts[i].append(d.text)
                    lps[i].extend(d.logprobs or [])
                    if d.finish_reason:
                        reasons[i] = d.finish_reason
                        used.finish(i, d)

            await unless_disconnected(request, collect())
            account(model, used)
            logprobs = [P.completion_logprobs(lp) if body.logprobs is not None else None for lp in lps]
            out = P.completion(rid, model, [("".join(t), r, lp) for t, r, lp in zip(texts, reasons, logprobs)],
                               used.prompt_tokens, used.completion_tokens)
            if body.prompt_logprobs is not None:
                for choice, plp in zip(out["choices"], vllm_lps):
                    choice["prompt_logprobs"] = plp
            return out

        with_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            created = P.now()

            def chunk(i, text, reason=None, lps=None, prompt_lps=None):
                choice = {"index": i, "text": text, "finish_reason": reason,
                          "logprobs": P.completion_logprobs(lps) if lps is not None else None}
                if prompt_lps is not None:
                    choice["prompt_logprobs"] = prompt_lps
                return _sse(P.completion_chunk(rid, model, created, [choice], with_usage=with_usage))

            def chunks(i: int, d: Delta) -> Iterator[str]:
                if d.text or d.logprobs or d.finish_reason:
                    yield chunk(i, d.text, d.finish_reason, d.logprobs if body.logprobs is not None else None)

            for i in range(k):
                if echo[i] or vllm_lps[i] is not None:
                    yield chunk(i, echo[i], lps=echo_lps[i] if body.echo and body.logprobs is not None else None,
                                prompt_lps=vllm_lps[i])
            async for event in stream_events(
                    model, merged(model, streams, firsts, started), used, chunks,
                    (lambda: _sse(P.completion_chunk(rid, model, created, [], used.as_dict(), True)))
                    if with_usage else None):
                yield event

        return _event_stream(events())

    @app.post("/v1/embeddings")
    async def embeddings(body: P.EmbeddingRequest):
        texts = body.texts()
        result = await client.embed(body.model, texts)
        metrics.prompt_tokens.labels(body.model).inc(result.prompt_tokens)
        return P.embedding_response(body.model, result.vectors, body.encoding_format, result.prompt_tokens)

    # Last: every other /v1 path and method gets OpenAI's 404 or 405 here, also when a web UI is mounted at /
    # (its mount would otherwise answer in its own shape).
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def unknown_v1(path: str, request: Request):
        allowed = sorted({m for r in app.routes if getattr(r, "path", "").startswith("/v1/")
                          and r.path != "/v1/{path:path}" and r.path_regex.match(request.url.path)
                          for m in getattr(r, "methods", ()) or ()})
        if allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise HTTPException(404)

    return app


async def _prepend(first: Delta, stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """``first`` (already read to learn the status), then the rest of ``stream``."""
    try:
        yield first
        if not first.finish_reason:
            async for d in stream:
                yield d
    finally:
        await stream.aclose()
