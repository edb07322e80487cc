"""What every serving component shares: the request and the streamed delta (errors: :mod:`vicuna.errors`).

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

from ..errors import InvalidRequest


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
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob plus the top k
    constraint: dict[str, Any] | None = None  # structured output: {"type", "value", "param"} (serve.structured)
    tools: list[dict[str, Any]] | None = None  # OpenAI tool objects, rendered into the prompt
    # beside tools when no call is forced: "auto" or "none" (our engines render tools and parse the text;
    # an upstream endpoint is passed them and returns its own calls). A forced call is a constraint.
    tool_choice: str | None = None
    parallel_tool_calls: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> "GenerateRequest":
        """A request received over HTTP (by a worker): exact types, or a 400 naming the field (value
        ranges are checked where sampling settings are built, as for every request)."""
        check_unicode(d, "request")
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
    # the first delta of a request that asked for them: one entry per prompt token, the first one's
    # logprob None ({"token", "token_id", "logprob", "rank", "top", "top_ids"})
    prompt_logprobs: list[dict] | None = None
    # complete calls an upstream endpoint made itself ({"id", "type", "function": {"name", "arguments"}}),
    # on the last delta; our own engines' calls are parsed from ``text`` (vicuna.serve.tools)
    tool_calls: list[dict] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, later: "Delta") -> "Delta":
        """This delta followed by ``later``, as one (a consumer that lags gets fewer, larger pieces)."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        calls = None if self.tool_calls is None and later.tool_calls is None else \
            (self.tool_calls or []) + (later.tool_calls or [])
        return Delta(self.text + later.text, later.finish_reason, later.prompt_tokens, later.completion_tokens,
                     logprobs, self.prompt_logprobs or later.prompt_logprobs, calls)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Delta":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_unicode(data: Any, where: str = "") -> None:
    """Refuse strings that are not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON can
    spell but UTF-8 cannot encode): a 400 naming where it is, before any tokenizer or JSON encoder meets it
    (there it was a 500 that also dropped the connection). Iterative: nesting depth is bounded elsewhere."""
    stack = [(where, data)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{path or 'the request'} is not valid Unicode text: it contains a lone "
                                     "surrogate (such as \\ud800, half of a UTF-16 pair); send UTF-8 text",
                                     param=path or None, code="invalid_unicode") from None
        elif isinstance(item, dict):
            for k, v in item.items():
                check_unicode(k, f"{path}.<key>" if path else "<key>") if isinstance(k, str) else None
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))


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
