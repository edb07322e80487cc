"""The OpenAI wire protocol: typed requests, response builders. No serving logic here.

Requests ignore unknown fields (clients send many we do not use); types are
checked by pydantic and value ranges by :class:`vicuna.generation.SamplingParams`,
both of which name the offending parameter in the 400 they cause.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import InvalidRequest
from ..generation import logprob_token_bytes
from . import structured, tools
from .core import Delta, GenerateRequest


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a role "tool" message: the call it answers


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(populate_by_name=True)  # merged with _Request's
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's ``response_format``."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs`` object (the newer spelling of its ``guided_*`` fields)."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(populate_by_name=True)  # merged with _Request's


class ToolFunction(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: ToolFunction


class NamedToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # extensions (as in vLLM)
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    # structured outputs (vicuna.serve.structured): OpenAI's response_format and vLLM's extras
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling(self, *, max_tokens: int | None, logprobs: int | None, max_stops: int = 16) -> dict[str, Any]:
        if max_tokens is not None and max_tokens < 1:
            name = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) is not None else "max_tokens"
            raise InvalidRequest(f"{name} must be >= 1, got {max_tokens}", param=name)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > max_stops:
            raise InvalidRequest(f"stop: at most {max_stops} stop strings are allowed, got {len(stop)}", param="stop")
        return dict(
            # unset sampling fields stay None: the model's generation_config defaults apply (as in vLLM)
            temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens, stop=stop, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos, logprobs=logprobs,
            constraint=structured.from_request(self),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # tool calling (vicuna.serve.tools)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    _tool_plan: Any = PrivateAttr(default=None)

    def to_generate(self) -> GenerateRequest:
        if not self.messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":  # an assistant turn may carry only tool calls
                raise InvalidRequest(f"messages[{i}].content is required for role {m.role!r}",
                                     param=f"messages[{i}].content")
        messages = [m.model_dump(exclude_none=True) for m in self.messages]
        options = self.sampling(max_tokens=max_tokens, logprobs=logprobs)
        self._tool_plan = tools.plan(self, messages, options["constraint"])
        options["constraint"] = self._tool_plan.constraint
        return GenerateRequest(messages=messages, tools=self._tool_plan.tools, **options)

    @property
    def tool_plan(self) -> "tools.ToolPlan":
        """How this request's tool calls are produced and parsed (set by ``to_generate``)."""
        return self._tool_plan


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    max_tokens: int | None = 16  # OpenAI's default for legacy completions

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise InvalidRequest("prompt must be a non-empty string or list of strings", param="prompt")
        return prompts

    def to_generate(self, prompt: str) -> GenerateRequest:
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo together with logprobs (prompt logprobs) is not supported", param="echo")
        return GenerateRequest(prompt=prompt, **self.sampling(max_tokens=self.max_tokens, logprobs=self.logprobs))


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise InvalidRequest("input must not be empty", param="input")
        if not all(isinstance(x, str) for x in items):
            raise InvalidRequest("input as token ids is not supported; send text", param="input")
        if self.dimensions is not None:
            raise InvalidRequest("dimensions is not supported by this model", param="dimensions")
        return items


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(names: list[str], owned_by: str = "vicuna") -> dict[str, Any]:
    created = now()
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": owned_by} for n in names]}


def chat_logprobs(entries: list[dict]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": logprob_token_bytes(token)}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, v) for t, v in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict[str, Any]:
    tokens = [e["token"] for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += 0 if t.startswith("bytes:\\x") else len(t)  # part of a character: no text of its own yet
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def chat_completion(rid: str, model: str, choices: list[tuple], prompt_tokens: int, completion_tokens: int
                    ) -> dict[str, Any]:
    """``choices``: (text, finish_reason, logprob entries or None[, tool_calls or None]) per choice."""
    def message(text, calls=None):
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}

    return {
        "id": rid, "object": "chat.completion", "created": now(), "model": model,
        "choices": [{"index": i, "message": message(c[0], *c[3:]),
                     "logprobs": chat_logprobs(c[2]) if c[2] is not None else None, "finish_reason": c[1]}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def _chunk(obj: str, rid: str, model: str, created: int, choices: list[dict], usage_: dict | None,
           with_usage: bool) -> dict[str, Any]:
    """One streamed chunk; with ``stream_options.include_usage`` every chunk carries ``usage`` (null but the last)."""
    chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    return _chunk("chat.completion.chunk", rid, model, created, choices, usage_, with_usage)


def chat_choice_delta(index: int, delta: Delta | None = None, *, role: bool = False) -> dict[str, Any]:
    if role:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    assert delta is not None
    body = {"content": delta.text} if delta.text else {}
    return {"index": index, "delta": body,
            "logprobs": chat_logprobs(delta.logprobs) if delta.logprobs is not None else None,
            "finish_reason": delta.finish_reason}


def completion(rid: str, model: str, choices: list[tuple[str, str, dict | None]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": now(), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": lps, "finish_reason": reason}
                    for i, (text, reason, lps) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None,
                     with_usage: bool = False) -> dict[str, Any]:
    return _chunk("text_completion", rid, model, created, choices, usage_, with_usage)


def embedding_response(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int) -> dict[str, Any]:
    def encode(v: list[float]):
        # base64 of little-endian float32, which is what the official client decodes
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding == "base64" else v

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
