"""The inference engine: iteration-level (continuous) batching over a Hugging Face model.

Requests join the running batch between decode steps and leave as soon as they
finish; each keeps its own sampling settings, seed, stops and token budget
(all in :class:`vicuna.generation.Sequence`, the same code single-request
generation uses). The model runs in one background thread; the asyncio side
hands requests in through a thread-safe inbox and gets deltas back through
``loop.call_soon_threadsafe``. The engine knows nothing of HTTP.

Why our own scheduler and not ``transformers``' ``init_continuous_batching``:
on CPU the latter packs every request into one sequence with a dense
block-diagonal mask, which measured at about half of static batching here and
applies one set of sampling settings to the whole batch. This scheduler keeps
a preallocated KV cache of ``max_batch_size`` rows in which every row ends at
the same column ``T`` (rows are right-aligned; the left is masked padding).
A decode step writes one column for all rows in place — no ``torch.cat`` of
the cache — and each row gets its true ``position_ids``, so a request's
outputs do not depend on who else is in the batch. New requests are
prefilled alone (exactly like single-request generation) and their KV copied
into a free row; finished rows are replaced by the last row (one row copy).
When ``T`` hits the buffer end, or enough shared padding piles up, the cache
is shifted left by the padding every row has. On CUDA at scale, use the vLLM
backend (:mod:`vicuna.serve.engine_vllm`): paged KV and fused kernels.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ..conversation import TemplateError, encode, render_prompt
from ..generation import (ContextLengthError, GenerationError, ModelDefaults, SamplingParams, Sequence,
                          fit_max_new_tokens, sampling_params)
from .core import ContextLengthExceeded, Delta, GenerateRequest, InvalidRequest, Overloaded, ServeError

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Scheduler limits. ``max_batch_size=1`` gives the reference worker's one-at-a-time behaviour."""

    max_batch_size: int = 32  # sequences decoded together (rows of the KV buffer)
    max_queue: int = 256  # requests waiting for a row; beyond this: 429 with Retry-After
    max_model_len: int | None = None  # prompt + completion; default: the model's context length
    default_max_tokens: int = 512  # when a request gives no max_tokens
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per iteration (bounds decode stalls)

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ServeError(f"engine setting {name} must be >= 1, got {getattr(self, name)}", status=500)


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    tokens_per_second: float = 0.0  # over the last few seconds
    ttft_count: int = 0  # time to first token, summed, for a mean
    ttft_sum: float = 0.0
    decode_steps: int = 0
    cache_shifts: int = 0  # right shifts for long joiners + left compactions


@dataclass
class _Request:
    prompt_ids: list[int]
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    length: int = 0  # tokens in the KV cache for this row
    last_token: int = -1  # sampled, not yet in the cache
    logprobs_sent: int = 0
    first_token_at: float | None = None


def _deliver(items: list[tuple[_Request, Any]]) -> None:
    for r, item in items:
        r.queue.put_nowait(item)


class _SlotCache:
    """KV cache of fixed rows; every forward writes columns [T, T+n) of rows [0, B).

    Presents the ``transformers`` Cache interface the attention layers call
    (``update(k, v, layer_idx)``); the mask is built by the engine as a 4-D
    tensor, so the model's own mask logic is skipped.
    """

    def __init__(self, num_layers: int):
        from transformers.cache_utils import Cache, DynamicLayer

        cache = self

        class SlotLayer(DynamicLayer):
            def __init__(self, idx: int):
                super().__init__()
                self.idx = idx

            def update(self, key_states, value_states, *args, **kwargs):
                k, v = cache.k[self.idx], cache.v[self.idx]
                b, t, n = cache.batch, cache.length, key_states.shape[-2]
                k[:b, :, t:t + n] = key_states
                v[:b, :, t:t + n] = value_states
                return k[:b, :, :t + n], v[:b, :, :t + n]

            def get_seq_length(self) -> int:
                return cache.length

        self.inner = Cache(layers=[SlotLayer(i) for i in range(num_layers)])
        self.k: list = []
        self.v: list = []
        self.batch = 0
        self.length = 0

    def allocate(self, like_layers, rows: int, cols: int) -> None:
        import torch

        for layer in like_layers:
            _, heads, _, dim = layer.keys.shape
            self.k.append(torch.zeros(rows, heads, cols, dim, dtype=layer.keys.dtype, device=layer.keys.device))
            self.v.append(torch.zeros(rows, heads, cols, dim, dtype=layer.values.dtype, device=layer.values.device))

    @property
    def allocated(self) -> bool:
        return bool(self.k)


class EngineBase:
    """What every backend shares: turning a request into prompt ids and validated sampling settings.

    Subclasses set ``name``, ``tokenizer``, ``template``, ``max_model_len``,
    ``defaults`` (the model's stop ids and sampling defaults) and ``config``, and implement ``generate``, ``embed``,
    ``stats``, ``info``, ``start`` and ``stop``.
    """

    name: str
    tokenizer: Any
    template: Any
    max_model_len: int
    defaults: ModelDefaults
    config: EngineConfig

    def prepare(self, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """Render, tokenize and validate; every failure is a 400 naming the parameter."""
        tok = self.tokenizer
        if request.messages is not None:
            if not isinstance(request.messages, list) or not request.messages:
                raise InvalidRequest("messages must be a non-empty list of {role, content} objects",
                                     param="messages")
            try:
                ids = encode(tok, render_prompt(self.template, request.messages, tok))
            except (TemplateError, KeyError, TypeError, AttributeError) as e:
                raise InvalidRequest(f"invalid messages: {e}", param="messages") from None
            where = "messages"
        else:
            if not isinstance(request.prompt, str) or not request.prompt:
                raise InvalidRequest("prompt must be a non-empty string", param="prompt")
            ids = list(tok(request.prompt)["input_ids"])  # a raw prompt gets the tokenizer's BOS, like vLLM
            where = "prompt"
        if not ids:
            raise InvalidRequest(f"the {where} encodes to no tokens", param=where)
        try:
            max_new = fit_max_new_tokens(len(ids), request.max_tokens, self.max_model_len,
                                         default=self.config.default_max_tokens)
            params = sampling_params(
                self.defaults, max_new_tokens=max_new, temperature=request.temperature, top_p=request.top_p,
                top_k=request.top_k, repetition_penalty=request.repetition_penalty,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                seed=request.seed, stop=request.stop, ignore_eos=request.ignore_eos, logprobs=request.logprobs,
                strip_leading=request.messages is not None,
            )
        except ContextLengthError as e:
            raise ContextLengthExceeded(str(e), param=where) from None
        except GenerationError as e:
            raise InvalidRequest(str(e), param=e.param) from None
        return ids, params

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


class HFEngine(EngineBase):
    """Continuous-batching engine over a :class:`vicuna.model.LoadedModel`."""

    backend = "hf"

    def __init__(self, loaded, config: EngineConfig | None = None):
        self.loaded = loaded
        self.name = loaded.name
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.template = loaded.template
        self.defaults = loaded.defaults
        self.config = config or EngineConfig()
        self.max_model_len = min(self.config.max_model_len or loaded.context_length, loaded.context_length)
        self._inbox: collections.deque[_Request] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[_Request] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cache: _SlotCache | None = None
        self._mask = None
        self._stats = EngineStats()
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (step time, tokens)
        self._step_time = 0.0
        self._lock = threading.Lock()
        attn = getattr(self.model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            # The scheduler passes its own 4-D padding mask, which flash/flex kernels do not take.
            log.warning("attention %r does not take a 4-D padding mask; the HF engine switches to sdpa "
                        "(use --backend vllm for flash attention)", attn)
            self.model.set_attn_implementation("sdpa")
            attn = "sdpa"
        self._float_mask = attn == "eager"  # eager adds the mask; sdpa takes a boolean one

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HFEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Stream deltas for one request. Closing the iterator aborts it in the engine."""
        prompt_ids, params = self.prepare(request)
        if self._thread is None:
            raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
        queue: asyncio.Queue = asyncio.Queue()
        req = _Request(prompt_ids, Sequence(self.tokenizer, prompt_ids, params), asyncio.get_running_loop(), queue)
        with self._cv:
            if len(self._inbox) >= self.config.max_queue:
                raise Overloaded(
                    f"the server is overloaded: {len(self._inbox)} requests already wait for {self.name}; "
                    "retry shortly", retry_after=self._retry_after())
            self._inbox.append(req)
            self._cv.notify()
        try:
            while True:
                item = await queue.get()
                # under load the consumer lags behind the engine: send what piled up as one delta
                while not queue.empty() and isinstance(item, Delta) and not item.finish_reason:
                    later = queue.get_nowait()
                    if isinstance(later, BaseException):
                        queue.put_nowait(later)  # keep order: deliver the text, then raise
                        break
                    item = item.merge(later)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            if not req.done:
                req.cancelled = True
                with self._cv:
                    self._cv.notify()

    def _retry_after(self) -> float:
        rate = max(self.stats().tokens_per_second, 1.0)
        return round(min(30.0, max(1.0, len(self._inbox) * self.config.default_max_tokens / rate / 4)), 1)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled last hidden state, L2-normalised; run between decode steps."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise InvalidRequest(f"input[{i}] must be a non-empty string", param="input")
        ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        for i, x in enumerate(ids):
            if len(x) > self.max_model_len:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(x)} tokens; this model's maximum context length is "
                    f"{self.max_model_len} tokens", param="input")
        return await asyncio.wrap_future(self._call(lambda: self._embed(ids))), sum(map(len, ids))

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        import torch

        out = []
        device = next(self.model.parameters()).device
        for ids in batch:
            hidden = self.model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                                use_cache=False, logits_to_keep=1).hidden_states[-1][0]
            vec = torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=-1)
            out.append(vec.cpu().tolist())
        return out

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            fut.set_exception(ServeError("the engine is not running", status=503, code="model_unavailable"))
            return fut
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    # ------------------------------------------------------------------ state
    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
        s.waiting, s.running = len(self._inbox), len(self._rows)
        now = time.perf_counter()
        with self._lock:
            window = [(t, n) for t, n in self._rate if now - t <= 10.0]
        if window:
            span = max(now - window[0][0], 1e-3)
            s.tokens_per_second = sum(n for _, n in window) / span
        else:
            s.tokens_per_second = 0.0
        return s

    @property
    def queue_length(self) -> int:
        return len(self._inbox) + len(self._rows)

    def info(self) -> dict[str, Any]:
        t = self.template
        return {
            "model": self.name, "backend": self.backend, "context_length": self.max_model_len,
            "conv_template": getattr(t, "name", "jinja"), "device": self.loaded.device,
            "num_parameters": self.loaded.num_parameters, "max_batch_size": self.config.max_batch_size,
            "max_queue": self.config.max_queue,
        }

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._rows or self._calls):
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # a real fault: fail every request in flight, keep serving
                    log.exception("engine step failed")
                    err = ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500)
                    for r in self._rows:
                        self._fail(r, err)
                    self._rows.clear()
                    if self._cache is not None:
                        self._cache.batch = self._cache.length = 0
        for r in list(self._rows) + list(self._inbox):
            self._fail(r, ServeError("the engine stopped", status=503, code="model_unavailable"))
        self._rows.clear()
        self._inbox.clear()

    def _fail(self, r: _Request, err: ServeError) -> None:
        r.done = True
        self._send(r, err)
        self._flush()

    def _send(self, r: _Request, item: Any) -> None:
        self._outbox.setdefault(r.loop, []).append((r, item))

    def _flush(self) -> None:
        """Hand this iteration's deltas to their event loops: one wake-up per loop, not one per row."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for r, _ in items:
                    r.cancelled = True

    def _iteration(self) -> None:
        self._step_time = time.perf_counter()  # tokens of one iteration share one rate entry
        while self._calls:
            fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        self._drop_cancelled()
        budget = self.config.max_prefill_tokens
        admitted = 0
        while self._inbox and len(self._rows) < self.config.max_batch_size:
            r = self._inbox[0]
            if r.cancelled:
                self._inbox.popleft()
                self._abort(r)
                continue
            if admitted and len(r.prompt_ids) > budget:
                break
            self._inbox.popleft()
            budget -= len(r.prompt_ids)
            admitted += 1
            try:
                self._prefill(r)
            except Exception as e:  # e.g. out of memory on one long prompt: fail it, keep the batch
                log.exception("prefill failed")
                if r not in self._rows:
                    self._fail(r, ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500))
                else:
                    raise
        if self._rows:
            self._decode()
        self._flush()

    def _prefill(self, r: _Request) -> None:
        """Run the prompt alone (as single-request generation does) and move its KV into a row."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        past = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([r.prompt_ids], device=device), cache=past, use_cache=True,
                         logits_to_keep=1)
        with self._lock:
            self._stats.prompt_tokens += len(r.prompt_ids)
        token = r.seq.sample(out.logits[0, -1])
        self._emit(r, token)
        if r.done:
            return
        past = out.cache
        if self._cache is None:
            self._cache = _SlotCache(len(past.layers))
        c = self._cache
        if not c.allocated:
            c.allocate(past.layers, self.config.max_batch_size, self.max_model_len)
            self._mask = torch.zeros(self.config.max_batch_size, self.max_model_len, dtype=torch.bool,
                                     device=c.k[0].device)
        p, b, t = len(r.prompt_ids), c.batch, c.length
        if p > t:  # the new row is longer than the batch: shift everyone right
            self._shift(-(p - t))
            t = c.length
        for layer, (k, v) in enumerate(zip(c.k, c.v)):
            k[b, :, t - p:t] = past.layers[layer].keys[0]
            v[b, :, t - p:t] = past.layers[layer].values[0]
        self._mask[b].zero_()
        self._mask[b, t - p:t] = True
        r.length = p
        self._rows.append(r)
        c.batch = b + 1

    def _shift(self, s: int) -> None:
        """Move every row's columns left by ``s`` (or right by ``-s``); rows stay right-aligned."""
        c, b, t = self._cache, self._cache.batch, self._cache.length
        if b == 0:
            c.length = max(0, t - s)
            return
        new_t = t - s
        with self._lock:
            self._stats.cache_shifts += 1
        for buf in (*c.k, *c.v):
            if s > 0:
                buf[:b, :, :new_t] = buf[:b, :, s:t].clone()
            else:
                buf[:b, :, -s:new_t] = buf[:b, :, :t].clone()
        m = self._mask
        if s > 0:
            m[:b, :new_t] = m[:b, s:t].clone()
        else:
            m[:b, -s:new_t] = m[:b, :t].clone()
            m[:b, :-s] = False
        c.length = new_t

    def _decode(self) -> None:
        import torch

        c, rows = self._cache, self._rows
        b = len(rows)
        c.batch = b
        pad = c.length - max(r.length for r in rows)  # columns every row has as padding
        if pad and (c.length >= self.max_model_len or pad >= max(64, c.length // 4)):
            self._shift(pad)
        t = c.length
        device = c.k[0].device
        ids = torch.tensor([[r.last_token] for r in rows], device=device)
        pos = torch.tensor([[r.length] for r in rows], device=device)
        self._mask[:b, t] = True
        mask = self._mask[:b, :t + 1][:, None, None, :]
        if self._float_mask:
            mask = torch.zeros(mask.shape, dtype=c.k[0].dtype, device=device).masked_fill(
                ~mask, torch.finfo(c.k[0].dtype).min)
        logits = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=c.inner, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        c.length = t + 1
        greedy = torch.argmax(logits, dim=-1).tolist()  # one batched argmax for plain greedy rows
        with self._lock:
            self._stats.decode_steps += 1
        for i, r in enumerate(rows):
            r.length += 1
            p = r.seq.params
            plain = p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not (
                p.presence_penalty or p.frequency_penalty)
            self._emit(r, greedy[i] if plain else r.seq.sample(logits[i]))
        self._drop_finished()

    def _emit(self, r: _Request, token: int) -> None:
        seq = r.seq
        text = seq.append(token)
        r.last_token = token
        now = time.perf_counter()
        with self._lock:
            self._stats.generated_tokens += 1
            if self._rate and self._rate[-1][0] == self._step_time:
                self._rate[-1] = (self._step_time, self._rate[-1][1] + 1)
            else:
                self._rate.append((self._step_time, 1))
            while self._rate and now - self._rate[0][0] > 10.0:
                self._rate.popleft()
        logprobs = None
        if seq.params.logprobs is not None and len(seq.logprobs) > r.logprobs_sent:
            logprobs = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top}
                        for lp in seq.logprobs[r.logprobs_sent:]]
            r.logprobs_sent = len(seq.logprobs)
        if text or seq.finished or logprobs:
            if r.first_token_at is None:
                r.first_token_at = now
                with self._lock:
                    self._stats.ttft_count += 1
                    self._stats.ttft_sum += now - r.arrival
            self._send(r, Delta(text, seq.finish_reason, len(r.prompt_ids), len(seq.output_ids), logprobs))
        if seq.finished:
            r.done = True
            with self._lock:
                self._stats.requests_finished += 1

    def _abort(self, r: _Request) -> None:
        r.seq.finish("abort")
        r.done = True
        with self._lock:
            self._stats.requests_aborted += 1

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._rows if r.cancelled and not r.done]:
            self._abort(r)
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Remove finished rows: the last row moves into the freed one (a single row copy)."""
        c = self._cache
        if c is None:
            return
        i = 0
        while i < len(self._rows):
            if not self._rows[i].done:
                i += 1
                continue
            last = len(self._rows) - 1
            if i != last:
                t = c.length
                for buf in (*c.k, *c.v):
                    buf[i, :, :t] = buf[last, :, :t]
                self._mask[i, :t] = self._mask[last, :t]
                self._rows[i] = self._rows[last]
            self._rows.pop()
        c.batch = len(self._rows)
        if not self._rows:
            c.length = 0
