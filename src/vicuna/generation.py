"""The generation core: sampling, stop handling, incremental detokenization.

:class:`Sequence` holds everything per request that is not the model: the
sampling parameters and RNG, the output ids, the text emitted so far, and why
it finished. :func:`generate_stream` drives one request with a KV cache; the
serving engine drives many ``Sequence`` objects in one batch with the same
code, so a request behaves identically alone and batched.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence as Seq

from .errors import VicunaError


class GenerationError(VicunaError):
    """Bad generation request; ``param`` names the offending parameter."""

    exit_code = 2

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthError(GenerationError):
    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the prompt, {max_new_tokens} for the "
            f"completion). Shorten the prompt or lower max_tokens.",
            param="messages", code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.requested = prompt_tokens + max_new_tokens
        self.context_length = context_length


MAX_REPETITION_PENALTY = 10.0  # [0.1, 10]: beyond, logits scale into overflow
MAX_SEED = 2**63 - 1  # what torch.Generator and every client language take
DEFAULT_MAX_NEW_TOKENS = 512  # a completion's budget when the request sets none (chat, API, web UI)
DEFAULT_TEMPERATURE = 0.7  # FastChat's default for chat models that ship none


@dataclass
class SamplingParams:
    """Per-request sampling settings; ``temperature == 0`` means greedy."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # HF-style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI-style, over output
    frequency_penalty: float = 0.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: chosen token plus the top k
    prompt_logprobs: int | None = None  # None: off; k: every prompt token's logprob plus the top k (scoring)
    # Chat answers: drop whitespace before the first visible character. Templates put a space
    # between "ASSISTANT:" and the answer, which the model generates; kept, it would come back
    # doubled when the client sends the answer in the next turn's history (FastChat strips too).
    strip_leading: bool = False
    # Structured outputs: the compiled grammar the output must follow (vicuna.serve.structured), or None.
    constraint: Any = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(self.stop_token_ids)
        # (API parameter name, its value, rule, ok): errors name the parameter as clients spell it.
        # The ranges are sane, not just legal: a repetition penalty of 1e-38 divides logits into
        # inf and poisons the sampler, and one request must never be able to do that to a batch.
        checks = [
            ("temperature", self.temperature, ">= 0 (0 = greedy)", lambda v: v >= 0),
            ("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1),
            ("top_k", self.top_k, "an integer >= 0 (0 = off)", lambda v: isinstance(v, int) and v >= 0),
            ("repetition_penalty", self.repetition_penalty, f"in [{1 / MAX_REPETITION_PENALTY:g}, "
             f"{MAX_REPETITION_PENALTY:g}] (1 = off)", lambda v: 1 / MAX_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY),
            ("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2),
            ("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2),
            # 0 new tokens only to score a prompt (echo + logprobs with max_tokens=0)
            ("max_tokens", self.max_new_tokens, "an integer >= 1" if self.prompt_logprobs is None else
             "an integer >= 0", lambda v: isinstance(v, int) and v >= (0 if self.prompt_logprobs is not None else 1)),
            ("seed", self.seed, f"an integer in [0, {MAX_SEED}]",
             lambda v: v is None or (isinstance(v, int) and 0 <= v <= MAX_SEED)),
            ("top_logprobs", self.logprobs, "an integer in [0, 20]",
             lambda v: v is None or (isinstance(v, int) and 0 <= v <= 20)),
            ("prompt_logprobs", self.prompt_logprobs, "an integer in [0, 20]",
             lambda v: v is None or (isinstance(v, int) and 0 <= v <= 20)),
        ]
        for param, value, rule, ok in checks:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and (not number or not math.isfinite(value) or not ok(value)):
                raise GenerationError(f"{param} must be {rule}, got {value!r}", param=param)
            if value is None and param not in ("seed", "top_logprobs", "prompt_logprobs"):
                raise GenerationError(f"{param} must be {rule}, got None", param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


@dataclass(frozen=True)
class ModelDefaults:
    """How a model wants to generate, as its authors shipped it.

    ``stop_token_ids`` is the union of the tokenizer's EOS, the template's end-of-turn tokens and
    ``generation_config.json``'s ``eos_token_id`` (an int or a list): a model whose turns end on
    ``<|eot_id|>`` or ``<end_of_turn>`` stops there. The sampling fields are what a request gets
    when it does not set them (see :func:`vicuna.model.model_defaults` for where they come from).
    """

    stop_token_ids: tuple[int, ...] = ()
    stop_strs: tuple[str, ...] = ()  # the template's text stops ("###" for the old formats)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def describe(self) -> str:
        if self.temperature < 1e-5:
            return "greedy"
        extra = "".join(f", {k} {v:g}" for k, v, off in (("top_p", self.top_p, 1.0), ("top_k", self.top_k, 0),
                        ("repetition_penalty", self.repetition_penalty, 1.0)) if v != off)
        return f"temperature {self.temperature:g}{extra}"


def sampling_params(
    defaults: ModelDefaults,
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: Seq[str] | str | None = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    strip_leading: bool = False,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The one place a request's settings meet the model's defaults.

    ``None`` means "not set by the request": the model's shipped default applies. Stops are
    always the request's plus the model's — a request cannot switch off the end of a turn
    (only ``ignore_eos`` can, for benchmarks). Raises :class:`GenerationError` naming the
    offending parameter.
    """
    d = defaults
    request_stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(
        temperature=d.temperature if temperature is None else temperature,
        top_p=d.top_p if top_p is None else top_p,
        top_k=d.top_k if top_k is None else top_k,
        repetition_penalty=d.repetition_penalty if repetition_penalty is None else repetition_penalty,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        max_new_tokens=max_new_tokens, seed=seed,
        stop=request_stops + tuple(s for s in d.stop_strs if s not in request_stops),
        stop_token_ids=d.stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs, strip_leading=strip_leading,
        prompt_logprobs=prompt_logprobs,
    )


def fit_max_new_tokens(prompt_tokens: int, max_new_tokens: int | None, context_length: int,
                       default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """Bound the completion by the context; an explicit request that cannot fit is an error.

    Like OpenAI and vLLM: an explicit ``max_tokens`` beyond what is left is a
    400; an implicit default shrinks to what is left.
    """
    left = context_length - prompt_tokens
    if max_new_tokens is None:
        if left < 1:
            raise ContextLengthError(prompt_tokens, 1, context_length)
        return min(default, left)
    if max_new_tokens > left:
        raise ContextLengthError(prompt_tokens, max_new_tokens, context_length)
    return max_new_tokens


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, never half a character, with a bounded hold-back.

    Decodes a short window (the previous emitted tokens and the pending ones)
    so tokenizers that drop a leading space when decoding a lone token
    (SentencePiece) still get spaces right. A window that ends in U+FFFD is an
    incomplete UTF-8 sequence split over byte tokens and is held until the next
    token completes it, but for at most ``MAX_HOLD`` tokens: a UTF-8 character
    is at most 4 bytes, so bytes still pending after that can never become one
    and are emitted as U+FFFD (a model emitting invalid UTF-8 still streams,
    and the window stays short).
    """

    MAX_HOLD = 4

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # end of what was emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            return self._advance(before, after, len(self.ids))
        if len(self.ids) - self.read >= self.MAX_HOLD:
            # the oldest pending bytes cannot complete any more: emit them, keep the last 3 (a char's tail)
            end = len(self.ids) - (self.MAX_HOLD - 1)
            return self._advance(before, self._decode(self.ids[self.prefix:end]), end)
        return ""

    def _advance(self, before: str, after: str, end: int) -> str:
        self.prefix, self.read = self.read, end
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any partial match.

    Text that could be the start of a stop string is not emitted until the
    next delta proves it is not, so a stop string split over tokens never leaks.
    """

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.buffer[: min(hits)]
            self.buffer = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def logprob_token_text(tokenizer: Any, token_id: int) -> str:
    """A token as logprobs name it: its text, or, when it is part of a UTF-8 character (its text alone decodes
    to U+FFFD), ``bytes:\\xe2\\x80`` as OpenAI writes such tokens. Two byte tokens then stay two entries of
    the completions API's ``top_logprobs`` dict instead of colliding on "\ufffd"."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    byte = _SENTENCEPIECE_BYTE.fullmatch(piece)
    if byte:
        raw = bytes([int(byte.group(1), 16)])
    elif piece and all(c in (decoder := _byte_level_decoder()) for c in piece):
        raw = bytes(decoder[c] for c in piece)
    else:
        return text  # a tokenizer of another kind: its text is all we know
    try:
        return raw.decode("utf-8")  # a whole character after all (the decode lost it to a cleanup)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def prompt_logprob_entries(tokenizer: Any, ids: Seq[int], logits, k: int) -> list[dict]:
    """Each prompt token's log-probability given the tokens before it, from ``logits`` (one row per prompt
    position: row j predicts token j + 1), with its rank and the top ``k`` alternatives. The first token has
    nothing before it: its logprob is None (OpenAI's ``echo`` shape). Scores in float32 whatever the model's
    dtype. Entries: ``{"token", "token_id", "logprob", "rank", "top": [(text, lp)], "top_ids": [(text, lp,
    id, rank)]}``."""
    import torch

    text = lambda i: logprob_token_text(tokenizer, i)  # noqa: E731
    ids = list(ids)
    out = [{"token": text(ids[0]), "token_id": ids[0], "logprob": None, "rank": None, "top": [], "top_ids": []}]
    if len(ids) < 2:
        return out
    lp = torch.log_softmax(logits[: len(ids) - 1].float(), dim=-1)
    target = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0]
    ranks = ((lp > chosen[:, None]).sum(dim=-1) + 1).tolist()
    top_v, top_i = (t.tolist() for t in torch.topk(lp, k, dim=-1)) if k else ([[]] * len(chosen),) * 2
    chosen = chosen.tolist()
    for j, tid in enumerate(ids[1:]):
        tops = [(text(i), v, i, r + 1) for r, (v, i) in enumerate(zip(top_v[j], top_i[j]))]
        out.append({"token": text(tid), "token_id": tid, "logprob": chosen[j], "rank": ranks[j],
                    "top": [(t, v) for t, v, _, _ in tops], "top_ids": tops})
    return out


def logprob_token_bytes(token: str) -> list[int]:
    """The UTF-8 bytes of a logprob token as :func:`logprob_token_text` names it."""
    if token.startswith("bytes:\\x"):
        return list(bytes.fromhex(token[len("bytes:"):].replace("\\x", "")))
    return list(token.encode())


class Sequence:
    """One request's decoding state, shared by single-request and batched generation."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams):
        import torch

        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.text = ""  # emitted text
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[dict] | None = None  # set by a prefill that scored the prompt
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(params.stop)
        self._stop_ids = set(params.stop_token_ids)
        self._generator = None
        if params.seed is not None:
            self._generator = torch.Generator().manual_seed(int(params.seed))
        self._counts: dict[int, int] = {}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits) -> int:
        """Choose the next token from 1-D ``logits`` with this request's settings."""
        import torch

        p = self.params
        logits = logits.float()
        raw = logits
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(self._counts)), dtype=torch.long, device=logits.device)
            if seen.numel():
                vals = logits[seen]
                logits = logits.clone()
                logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(self._counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        self._check_scores(logits)
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            logits = logits / p.temperature
            if p.top_k:
                kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
                keep[0] = True
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            gen = self._generator
            if gen is not None and gen.device != probs.device:
                probs = probs.cpu()
            token = int(torch.multinomial(probs, 1, generator=gen))
        if p.logprobs is not None:
            # like OpenAI: log-probabilities of the model's distribution, tokens as decoded text
            lp = torch.log_softmax(raw, dim=-1)
            text = lambda i: logprob_token_text(self.tokenizer, i)  # noqa: E731
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            self.logprobs.append(TokenLogprob(
                token=text(token), logprob=float(lp[token]),
                top=[(text(int(i)), float(v)) for v, i in zip(*top)] if top else [],
            ))
        return token

    def _check_scores(self, logits) -> None:
        """Refuse scores that are NaN, +inf or all -inf: sampling from them is meaningless (or raises)."""
        if math.isfinite(float(logits.max())):  # one reduction; NaN propagates through max
            return
        p = self.params
        culprit = next((name for name, on in (("repetition_penalty", p.repetition_penalty != 1.0),
                                              ("presence_penalty", p.presence_penalty != 0),
                                              ("frequency_penalty", p.frequency_penalty != 0)) if on), None)
        if culprit is None:
            raise GenerationError("the model's scores for the next token are not finite (inf/NaN)")
        raise GenerationError(f"{culprit}={getattr(p, culprit)!r} makes the next-token scores non-finite "
                              "(inf/NaN); use a value closer to the default", param=culprit)

    def append(self, token_id: int) -> str:
        """Record a sampled token; returns the text it releases (may be '')."""
        if self.finished:
            return ""
        if token_id in self._stop_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return self._emit(self._drain())
        self.output_ids.append(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        delta, hit = self._stops.feed(self._detok.push(token_id))
        if hit:
            self.finish_reason = "stop"
            return self._emit(delta)
        if len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            return self._emit(delta + self._drain())
        return self._emit(delta)

    def finish(self, reason: str) -> str:
        """End early (cancelled, context full); returns held-back text."""
        if self.finished:
            return ""
        self.finish_reason = reason
        return self._emit(self._drain())

    def _drain(self) -> str:
        """Release held-back text at the end; it may still complete a stop string."""
        out, hit = self._stops.feed(self._detok.flush())
        return out if hit else out + self._stops.flush()

    def _emit(self, text: str) -> str:
        if self.params.strip_leading and not self.text:
            text = text.lstrip()
        self.text += text
        return text


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def generate_stream(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
                    context_length: int | None = None) -> Iterator[StreamEvent]:
    """Stream one completion with a KV cache. Closing the iterator stops generation."""
    import torch

    if not prompt_ids:
        raise GenerationError("the prompt is empty", param="prompt")
    if context_length is not None and len(prompt_ids) + params.max_new_tokens > context_length:
        raise ContextLengthError(len(prompt_ids), params.max_new_tokens, context_length)
    seq = Sequence(tokenizer, prompt_ids, params)
    device = next(model.parameters()).device
    with torch.inference_mode():
        # logits_to_keep=1: only the last position's logits are needed (saves a vocab-sized matmul per token)
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        while True:
            token = seq.sample(out.logits[0, -1])
            text = seq.append(token)
            if seq.finished:
                yield StreamEvent(text, seq.finish_reason, len(prompt_ids), len(seq.output_ids))
                return
            if text:
                yield StreamEvent(text, None, len(prompt_ids), len(seq.output_ids))
            out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)


def generate(model, tokenizer, prompt_ids: list[int], params: SamplingParams, context_length: int | None = None):
    """Non-streaming convenience: (text, finish_reason, completion_tokens)."""
    text, last = [], None
    for ev in generate_stream(model, tokenizer, prompt_ids, params, context_length):
        text.append(ev.text)
        last = ev
    return "".join(text), last.finish_reason, last.completion_tokens
