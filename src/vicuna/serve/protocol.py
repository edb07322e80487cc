"""The OpenAI wire protocol: typed requests, response builders. No serving logic here.

Nothing a client sends is dropped without a word (issue: an agent that asks for something we ignore
loops or gets ``None``). Each request model *is* the list of fields we know: a field not declared
here is a 400 "Unrecognized request argument supplied: NAME", as OpenAI answers; a declared field we
cannot honour (``best_of`` > 1, ``use_beam_search``, ``suffix``...) is a 400 naming it; a few fields
that are metadata for the client's own bookkeeping (``user``, ``metadata``, ``store``,
``service_tier``) are accepted and have no effect (docs/serving.md lists every field). Types are
strict (``"stream": "yes"``, ``"seed": "5"`` or ``true`` are 400s naming the field), strings must be
valid Unicode (a lone surrogate such as ``"\\ud800"`` is a 400 naming where it is), and value ranges
are checked by :class:`vicuna.generation.SamplingParams`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..errors import InvalidRequest
from ..generation import logprob_token_bytes
from . import structured, tools
from .core import Delta, GenerateRequest, check_unicode


class _Request(BaseModel):
    # strict: no "5" for 5 or true for 1; forbid: an unknown field is refused, never ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class _TopLevel(_Request):
    """A whole request body: its strings are checked for invalid Unicode before anything else reads them."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        if isinstance(data, dict):  # null for a known field means "not set", as OpenAI reads it (clients send
            data = {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}  # their defaults)
        return data

    @model_validator(mode="after")
    def _supported(self):
        for name, (default, why) in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != default and not (isinstance(default, (dict, list)) and not value):
                raise InvalidRequest(f"{name}={value!r} is not supported: {why}", param=name,
                                     code="unsupported_parameter")
        return self


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
    # What the official SDK's message objects carry when a client appends a previous answer to the
    # history (``messages.append(response.choices[0].message)``): accepted when empty, refused otherwise.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a role "tool" message: the call it answers

    def as_dict(self) -> dict[str, Any]:
        """What the template renders: the SDK's empty extras (refusal, annotations...) left out."""
        return self.model_dump(include={"role", "content", "name", "tool_calls", "tool_call_id"}, exclude_none=True)


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
    continuous_usage_stats: bool = False  # vLLM's: every chunk has usage; we always send it when included


# Fields OpenAI or vLLM define that we cannot honour: name -> (the value that means "off", why).
_UNSUPPORTED_COMMON = {
    "best_of": (1, "only best_of=1 (sample n, return n) is served"),
    "use_beam_search": (False, "beam search is not implemented; sample with n instead"),
    "logit_bias": ({}, "logit_bias is not implemented"),
}


class _Sampling(_TopLevel):
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
    # metadata for the client's own bookkeeping: accepted, no effect here
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extensions (as in vLLM)
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    # known but refused unless "off" (see _UNSUPPORTED_COMMON)
    best_of: int | None = None
    use_beam_search: bool = False
    logit_bias: dict[str, float] | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = _UNSUPPORTED_COMMON

    # structured outputs (vicuna.serve.structured): OpenAI's response_format and vLLM's extras
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling(self, *, max_tokens: int | None, logprobs: int | None, max_stops: int = 16) -> dict[str, Any]:
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
    modalities: list[Literal["text"]] | None = None  # text is what we answer; "audio" is refused by its type

    # tool calling (vicuna.serve.tools)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    _tool_plan: Any = PrivateAttr(default=None)

    def to_generate(self) -> GenerateRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None and max_tokens < 1:  # named as the client spelled it (the engine says max_tokens)
            raise InvalidRequest(f"{name} must be >= 1, got {max_tokens}", param=name)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":  # an assistant turn may carry only tool calls
                raise InvalidRequest(f"messages[{i}].content is required for role {m.role!r}",
                                     param=f"messages[{i}].content")
        # an empty list is refused by the engine's prepare, the one check every caller goes through
        messages = [m.as_dict() for m in self.messages]
        options = self.sampling(max_tokens=max_tokens, logprobs=logprobs)
        self._tool_plan = tools.plan(self, messages, options["constraint"])
        plan = self._tool_plan
        options["constraint"] = plan.constraint
        free = plan.tools and plan.mode in ("auto", "none")
        return GenerateRequest(messages=messages, tools=plan.tools, tool_choice=plan.mode if free else None,
                               parallel_tool_calls=plan.parallel, **options)

    @property
    def tool_plan(self) -> "tools.ToolPlan":
        """How this request's tool calls are produced and parsed (set by ``to_generate``)."""
        return self._tool_plan


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs (and top k), without echo
    suffix: str | None = None
    max_tokens: int | None = 16  # OpenAI's default for legacy completions

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {**_UNSUPPORTED_COMMON, "suffix": ("", "insertion (suffix) is not supported by this model")}

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise InvalidRequest("prompt must be a non-empty string or list of strings", param="prompt")
        return prompts

    @property
    def scores_prompt(self) -> int | None:
        """How many top alternatives each prompt token's logprob comes with; None: the prompt is not scored.
        OpenAI's legacy API scores the prompt for ``echo`` with ``logprobs``; vLLM for ``prompt_logprobs``."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo and self.logprobs is not None else None

    def to_generate(self, prompt: str) -> GenerateRequest:
        max_tokens = self.max_tokens
        if max_tokens == 0 and self.scores_prompt is None:
            raise InvalidRequest("max_tokens=0 only makes sense with echo and logprobs (scoring the prompt); "
                                 "ask for at least 1 token", param="max_tokens")
        request = GenerateRequest(prompt=prompt, **self.sampling(max_tokens=max_tokens, logprobs=self.logprobs))
        request.prompt_logprobs = self.scores_prompt
        return request


class LoadLoraAdapterRequest(_TopLevel):
    """vLLM's ``POST /v1/load_lora_adapter`` body (``base_model_name``: ours, when several bases are served)."""

    lora_name: str
    lora_path: str
    base_model_name: str | None = None


class UnloadLoraAdapterRequest(_TopLevel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` is accepted and not needed)."""

    lora_name: str
    lora_int_id: int | None = None


class EmbeddingRequest(_TopLevel):
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


class TokenizeRequest(_TopLevel):
    """vLLM's ``/tokenize``: a ``prompt``, or chat ``messages`` rendered through the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("send exactly one of prompt or messages", param="prompt")
        return self


class DetokenizeRequest(_TopLevel):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, owned_by: str = "vicuna", created: int | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": now() if created is None else created, "owned_by": owned_by}


def model_list(names: list[str], owned_by: str = "vicuna") -> dict[str, Any]:
    created = now()
    return {"object": "list", "data": [model_card(n, owned_by, created) for n in names]}


def chat_logprobs(entries: list[dict]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": logprob_token_bytes(token)}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, v) for t, v in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict | None], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape; an entry of None is a prompt token with no logprob (the first one), as OpenAI
    sends it under ``echo``: its token is still listed, with ``null`` logprob and ``null`` alternatives."""
    tokens = [e["token"] for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += 0 if t.startswith("bytes:\\x") else len(t)  # part of a character: no text of its own yet
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) if e["logprob"] is not None else None for e in entries],
            "text_offset": offsets}


def vllm_prompt_logprobs(entries: list[dict]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else ``{token_id: {logprob, rank,
    decoded_token}}`` for the token itself and its top alternatives."""
    out: list[dict | None] = []
    for e in entries:
        if e["logprob"] is None:
            out.append(None)
            continue
        item = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": tok}
                for tok, lp, tid, rank in e["top_ids"]}
        item.setdefault(str(e["token_id"]), {"logprob": e["logprob"], "rank": e["rank"], "decoded_token": e["token"]})
        out.append(item)
    return out


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
