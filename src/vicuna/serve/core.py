"""What every serving component shares: the request, the streamed delta, the errors.

Kept free of torch and HTTP so the engine, the worker, the controller client
and the OpenAI front end can all speak it (and send it over the wire as JSON).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from typing import Any, AsyncIterator, Sequence, get_type_hints

from pydantic import ConfigDict, ValidationError, create_model

from ..errors import VicunaError

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


class ServeError(VicunaError):
    """A request failed; carries what an OpenAI-style error response needs.

    ``status`` is the HTTP status to answer with, ``code``/``param`` follow
    OpenAI's error object, ``retry_after`` (seconds) becomes a Retry-After header.
    """

    status = 500
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_dict(cls, body: Any, status: int, retry_after: float | None = None) -> "ServeError":
        """Rebuild an error sent by a worker (so the front end answers with the worker's status)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return ServeError(f"upstream answered {status}: {str(body)[:200]}", status=502 if status < 400 else status)
        sub = {404: ModelNotFound, 401: AuthError, 429: Overloaded, 503: Overloaded}.get(status, ServeError)
        if status == 400:
            sub = ContextLengthExceeded if err.get("code") == "context_length_exceeded" else InvalidRequest
        return sub(str(err.get("message", "")), status=status, code=err.get("code"), param=err.get("param"),
                   retry_after=retry_after)


class InvalidRequest(ServeError):
    status = 400


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthError(ServeError):
    status = 401
    code = "invalid_api_key"


class ModelNotFound(ServeError):
    status = 404
    code = "model_not_found"

    @classmethod
    def for_model(cls, model: str, available: list[str]) -> "ModelNotFound":
        names = ", ".join(available) or "none"
        return cls(f"The model {model!r} does not exist or is not served here. Available: {names}.", param="model")


class Overloaded(ServeError):
    """Back-pressure: the queue is full (429) or no worker can take the request (503)."""

    status = 429
    code = "rate_limit_exceeded"


class Unavailable(ServeError):
    status = 503
    code = "model_unavailable"


@dataclass
class GenerateRequest:
    """One completion to generate: chat ``messages`` or a raw ``prompt`` plus sampling settings.

    ``max_tokens=None`` means "as much as the context allows (up to the
    engine's default)"; an explicit value that does not fit is a 400. Unset
    sampling fields (None) take the model's shipped defaults.
    """

    messages: list[dict] | None = None
    prompt: str | None = None
    # sampling: None = not set by the client, the model's defaults apply (vicuna.generation.sampling_params)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    top_k: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerateRequest":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_wire(cls, d: Any) -> "GenerateRequest":
        """A request received over HTTP (by a worker): exact types, or a 400 naming the field (value
        ranges are checked where sampling settings are built, as for every request)."""
        try:
            checked = _wire_model().model_validate(d)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            where = f"{param}: " if param else ""
            raise InvalidRequest(f"invalid generate request: {where}{first['msg']}", param=param) from None
        return cls(**dict(checked))


@cache
def _wire_model():
    """A strict pydantic model of :class:`GenerateRequest`'s fields (built from them, so never out of step)."""
    hints = get_type_hints(GenerateRequest, include_extras=True)
    return create_model("GenerateRequestWire", __config__=ConfigDict(strict=True, extra="ignore"), **{
        f.name: (hints[f.name], f.default_factory() if f.default is MISSING else f.default)
        for f in fields(GenerateRequest)})


@dataclass
class Delta:
    """A piece of a streamed completion.

    ``text`` is new text since the previous delta; ``logprobs`` holds one entry
    per token sampled since the previous delta (``{"token", "logprob", "top"}``);
    the last delta has ``finish_reason`` set ("stop", "length" or "abort").
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, later: "Delta") -> "Delta":
        """This delta followed by ``later``, as one (a consumer that lags gets fewer, larger pieces)."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return Delta(self.text + later.text, later.finish_reason, later.prompt_tokens, later.completion_tokens,
                     logprobs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Delta":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def bearer_ok(authorization: str | None, keys: Sequence[str]) -> bool:
    """Whether an ``Authorization: Bearer TOKEN`` header carries one of ``keys`` (constant-time compare).

    The one check behind the API keys of the OpenAI API and the shared secret of workers and controller.
    """
    header = authorization or ""
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return any(secrets.compare_digest(token.encode(), k.encode()) for k in keys if k)


async def merge_streams(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, Any, BaseException | None]]:
    """Interleave async streams as they produce: ``(index, item, None)`` per item, then
    ``(index, None, error or None)`` when that stream ends.

    Used wherever several answers stream at once (the API's ``n`` choices, the arena's two sides), so
    none waits for another. Each stream is closed when it ends or when the consumer stops early
    (which aborts its generation in the engine).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it for that stream
            await queue.put((i, None, e))
        else:
            await queue.put((i, None, None))
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            running -= item[1] is None
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
