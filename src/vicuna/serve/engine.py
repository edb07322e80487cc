"""The inference engine: iteration-level (continuous) batching over a Hugging Face model, KV paged by a budget.

Requests join the running batch between decode steps and leave as soon as they
finish; each keeps its own sampling settings, seed, stops and token budget
(all in :class:`vicuna.generation.Sequence`, the same code single-request
generation uses). The model runs in one background thread; the asyncio side
hands requests in through a thread-safe inbox and gets deltas back through
``loop.call_soon_threadsafe``. The engine knows nothing of HTTP.

Memory is a budget, not a shape: the KV cache (:mod:`vicuna.serve.kv`) is a
pool of fixed-size blocks; a request is admitted when the blocks for its
prompt are free and takes one more block each time it crosses a block
boundary. When a decode step needs a block and none is free, the most
recently admitted request is preempted: its blocks are freed and it goes back
to the front of the queue; when readmitted, its prompt and everything it has
generated are prefilled again (recompute, as vLLM does) and its stream goes on
where it stopped. ``max_batch_size`` only caps how many rows decode together.

Each iteration: free what finished or was cancelled, run a bounded chunk of
embedding work, reserve the next slot of every running row (preempting if
needed), admit waiting requests and prefill them together in one left-padded
forward, then decode every running row in one forward. Each row gets its true
``position_ids`` and a mask over its own tokens only, so a request's output
does not depend on who else is in the batch. A row whose scores are not finite,
or whose sampling fails, fails alone; the others go on.

Why our own scheduler and not ``transformers``' ``init_continuous_batching``:
on CPU the latter packs every request into one sequence with a dense
block-diagonal mask, which measured at about half of static batching here and
applies one set of sampling settings to the whole batch. On CUDA at scale, use
the vLLM backend (:mod:`vicuna.serve.engine_vllm`): paged-attention kernels.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..conversation import TemplateError, encode, render_prompt
from ..generation import (ContextLengthError, GenerationError, ModelDefaults, SamplingParams, Sequence,
                          fit_max_new_tokens, sampling_params)
from .core import ContextLengthExceeded, Delta, GenerateRequest, InvalidRequest, Overloaded, ServeError
from .kv import BlockAllocator, KVPlan, KVShape, PagedKVCache, default_budget, format_size, parse_size

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Scheduler and memory limits (the engine's command-line flags are generated from these fields)."""

    max_batch_size: int = field(default=32, metadata={
        "help": "most sequences decoded together (1 = one request at a time); memory is set by --kv-cache-memory"})
    max_queue: int = field(default=256, metadata={
        "help": "requests that may wait for the batch; more are refused with 429 + Retry-After"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "prompt + completion token limit (default: the model's context length, at most what the KV "
                "cache holds)"})
    default_max_tokens: int = field(default=512, metadata={"help": "completion budget when a request sets none"})
    max_prefill_tokens: int = field(default=2048, metadata={
        "help": "prompt tokens (padding included) prefilled together in one forward; bounds how long "
                "decoding pauses for newcomers (one longer prompt still runs alone)"})
    kv_cache_memory: str | None = field(default=None, metadata={
        "help": "KV cache budget, e.g. 4GiB or 512MiB (K/M/G are powers of 1024); default: on CUDA up to 90 "
                "percent of the GPU less what is already in use, on CPU min(a quarter of available RAM, 4 GiB)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    max_embedding_inputs: int = field(default=256, metadata={
        "help": "most inputs one /v1/embeddings request may carry (more: 400)"})
    max_embedding_tokens: int = field(default=65536, metadata={
        "help": "most tokens one /v1/embeddings request may carry, all inputs together (more: 400)"})
    embedding_chunk_tokens: int = field(default=512, metadata={
        "help": "embedding tokens computed between two decode steps (bounds the pause embeddings cause)"})

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_prefill_tokens", "block_size",
                     "max_embedding_inputs", "max_embedding_tokens", "embedding_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ServeError(f"engine setting {name} must be >= 1, got {getattr(self, name)}", status=500)
        if self.kv_cache_memory is not None:
            parse_size(self.kv_cache_memory)  # fail at startup on an unreadable size


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # tokens prefilled (a preempted request's are counted again when recomputed)
    tokens_per_second: float = 0.0  # over the last few seconds
    ttft_count: int = 0  # time to first token, summed, for a mean
    ttft_sum: float = 0.0
    decode_steps: int = 0
    prefill_forwards: int = 0
    preemptions: int = 0
    kv_blocks: int = 0  # usable blocks of the KV cache
    kv_blocks_free: int = 0


@dataclass
class _Request:
    prompt_ids: list[int]
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    blocks: list[int] = field(default_factory=list)  # the block table: block i holds tokens [i*bs, (i+1)*bs)
    length: int = 0  # tokens of this request in the KV cache
    last_token: int = -1  # sampled, not yet in the cache
    logprobs_sent: int = 0
    first_token_at: float | None = None

    def context(self) -> list[int]:
        """What a prefill runs: the prompt and, after a preemption, everything generated so far."""
        return self.prompt_ids + self.seq.output_ids


@dataclass
class _EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future
    vectors: list[list[float]] = field(default_factory=list)


def _deliver(items: list[tuple[_Request, Any]]) -> None:
    for r, item in items:
        r.queue.put_nowait(item)


def _plain_greedy(p: SamplingParams) -> bool:
    """Rows the batched argmax serves without calling the sampler."""
    return p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not (
        p.presence_penalty or p.frequency_penalty)


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
    """Continuous-batching engine over a :class:`vicuna.model.LoadedModel`, its KV cache paged by a budget."""

    backend = "hf"

    def __init__(self, loaded, config: EngineConfig | None = None):
        self.loaded = loaded
        self.name = loaded.name
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.template = loaded.template
        self.defaults = loaded.defaults
        self.config = config or EngineConfig()
        param = next(self.model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self.kv_plan, how = self._plan_kv()
        self.max_model_len = min(self.config.max_model_len or loaded.context_length, loaded.context_length)
        if self.kv_plan.tokens < self.max_model_len:
            log.warning("%s: the KV cache (%s) holds %d tokens, less than the %d-token context: requests are "
                        "limited to %d tokens; raise --kv-cache-memory for longer ones", self.name,
                        format_size(self.kv_plan.bytes), self.kv_plan.tokens, self.max_model_len, self.kv_plan.tokens)
            self.max_model_len = self.kv_plan.tokens
        log.info("%s: KV cache %s (%s): %d blocks of %d tokens, %d tokens in all", self.name,
                 format_size(self.kv_plan.bytes), how, self.kv_plan.num_blocks, self.kv_plan.block_size,
                 self.kv_plan.tokens)
        self._kv = PagedKVCache(self.kv_plan, self._dtype, self._device)
        self._blocks = BlockAllocator(self.kv_plan.num_blocks)
        self._inbox: collections.deque[_Request] = collections.deque()  # waiting; preempted ones go first
        self._running: list[_Request] = []  # in admission order: the last is preempted first
        self._embeds: collections.deque[_EmbedJob] = collections.deque()
        self._cv = threading.Condition()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (step time, tokens)
        self._step_time = 0.0
        self._lock = threading.Lock()
        attn = getattr(self.model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            # The scheduler passes its own 4-D mask, which flash/flex kernels do not take.
            log.warning("attention %r does not take a 4-D padding mask; the HF engine switches to sdpa "
                        "(use --backend vllm for flash attention)", attn)
            self.model.set_attn_implementation("sdpa")
            attn = "sdpa"
        self._float_mask = attn == "eager"  # eager adds the mask; sdpa takes a boolean one

    def _plan_kv(self) -> tuple[KVPlan, str]:
        shape = KVShape.of(self.model.config, self._dtype)
        if self.config.kv_cache_memory is not None:
            budget, how = parse_size(self.config.kv_cache_memory), "--kv-cache-memory"
        else:
            budget, how = default_budget(self._device)
            how = f"default: {how}"
        return KVPlan.for_budget(shape, budget, self.config.block_size), how

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HFEngine":
        if self._thread is None:
            self._stopping = False
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
        stream = self.stream(prompt_ids, params)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream deltas for already validated prompt ids and settings (what ``generate`` runs)."""
        if self._thread is None:
            raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
        queue: asyncio.Queue = asyncio.Queue()
        req = _Request(list(prompt_ids), Sequence(self.tokenizer, prompt_ids, params), asyncio.get_running_loop(),
                       queue)
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
        """Mean-pooled last hidden state, L2-normalised; computed in bounded chunks between decode steps."""
        cfg = self.config
        if len(texts) > cfg.max_embedding_inputs:
            raise InvalidRequest(f"input has {len(texts)} items; this server embeds at most "
                                 f"{cfg.max_embedding_inputs} per request: split it into several requests",
                                 param="input")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise InvalidRequest(f"input[{i}] must be a non-empty string", param="input")
        ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        for i, x in enumerate(ids):
            if len(x) > self.max_model_len:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(x)} tokens; this model's maximum context length is "
                    f"{self.max_model_len} tokens", param="input")
        total = sum(map(len, ids))
        if total > cfg.max_embedding_tokens:
            raise InvalidRequest(f"input has {total} tokens in all; this server embeds at most "
                                 f"{cfg.max_embedding_tokens} tokens per request: split it into several requests",
                                 param="input")
        job = _EmbedJob(ids, concurrent.futures.Future())
        with self._cv:
            if self._thread is None:
                raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
            self._embeds.append(job)
            self._cv.notify()
        return await asyncio.wrap_future(job.future), total

    # ------------------------------------------------------------------ state
    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
            window = [(t, n) for t, n in self._rate if time.perf_counter() - t <= 10.0]
        s.waiting, s.running = len(self._inbox), len(self._running)
        s.kv_blocks, s.kv_blocks_free = self._blocks.num_blocks, self._blocks.num_free
        if window:
            span = max(time.perf_counter() - window[0][0], 1e-3)
            s.tokens_per_second = sum(n for _, n in window) / span
        return s

    @property
    def queue_length(self) -> int:
        return len(self._inbox) + len(self._running)

    def info(self) -> dict[str, Any]:
        t = self.template
        return {
            "model": self.name, "backend": self.backend, "context_length": self.max_model_len,
            "conv_template": getattr(t, "name", "jinja"), "device": self.loaded.device,
            "num_parameters": self.loaded.num_parameters, "max_batch_size": self.config.max_batch_size,
            "max_queue": self.config.max_queue, "kv_cache_tokens": self.kv_plan.tokens,
            "kv_cache_bytes": self.kv_plan.bytes, "kv_block_size": self.kv_plan.block_size,
        }

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            self._warm_up()
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._running or self._embeds):
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # a fault of the whole step: fail what was in it, keep serving
                    log.exception("engine step failed")
                    err = ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500)
                    for r in self._running:
                        self._fail(r, err)
                    self._running.clear()
                    self._flush()
        stopped = ServeError("the engine stopped", status=503, code="model_unavailable")
        for r in self._running + list(self._inbox):
            self._fail(r, stopped)
        self._running.clear()
        self._inbox.clear()
        self._flush()
        while self._embeds:
            self._settle(self._embeds.popleft().future, exception=stopped)

    def _warm_up(self) -> None:
        """One tiny prefill and decode at start, so the first request does not pay the kernels' set-up."""
        import torch

        blocks = self._blocks.allocate(self.kv_plan.blocks_for(9))
        if blocks is None:
            return
        try:
            slots, n = self._slots(blocks, 9).to(self._device), 8
            self._kv.plan_forward(slots[:n])
            self._forward(torch.zeros(1, n, dtype=torch.long), torch.arange(n)[None],
                          torch.ones(n, n, dtype=torch.bool).tril()[None, None])
            self._kv.plan_forward(slots[n:], slots[None])
            self._forward(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[n]]),
                          torch.ones(1, 1, 1, n + 1, dtype=torch.bool))
        except Exception:  # noqa: BLE001 - a failed warm-up is only slower; real requests report errors
            log.warning("engine warm-up failed", exc_info=True)
        finally:
            self._blocks.free(blocks)

    def _iteration(self) -> None:
        self._step_time = time.perf_counter()  # tokens of one iteration share one rate entry
        for r in self._running:
            if r.cancelled and not r.done:
                self._abort(r)
        self._drop_finished()
        self._embed_chunk()
        preempted = self._reserve_decode_slots()
        group = [] if preempted else self._admit()  # vLLM's rule: no newcomers in a step that preempted
        if group:
            self._prefill(group)
        if self._running:
            self._decode()
        self._flush()

    # ---- scheduling
    def _reserve_decode_slots(self) -> bool:
        """Give every running row a slot for its next token; preempt the latest admitted when blocks run out."""
        preempted, i = False, 0
        while i < len(self._running):
            r = self._running[i]
            if r.length < len(r.blocks) * self.kv_plan.block_size:
                i += 1
                continue
            block = self._blocks.allocate(1)
            if block is not None:
                r.blocks += block
                i += 1
                continue
            self._preempt(self._running.pop())  # may be r itself: then the loop ends
            preempted = True
        return preempted

    def _preempt(self, r: _Request) -> None:
        """Free ``r``'s blocks and queue it first; its context is recomputed when it is readmitted."""
        self._release(r)
        r.length = 0
        with self._lock:
            self._stats.preemptions += 1
        with self._cv:
            self._inbox.appendleft(r)

    def _admit(self) -> list[_Request]:
        """Waiting requests whose blocks are free, in arrival order, within the prefill token budget."""
        group: list[_Request] = []
        width = 0
        while self._inbox and len(self._running) + len(group) < self.config.max_batch_size:
            r = self._inbox[0]
            if r.cancelled:
                self._inbox.popleft()
                self._abort(r)
                continue
            n = len(r.prompt_ids) + len(r.seq.output_ids)
            if group and max(width, n) * (len(group) + 1) > self.config.max_prefill_tokens:
                break
            blocks = self._blocks.allocate(self.kv_plan.blocks_for(n + 1))  # + the slot of its next token
            if blocks is None:
                break
            self._inbox.popleft()
            r.blocks = blocks
            group.append(r)
            width = max(width, n)
        return group

    # ---- forwards
    def _slots(self, blocks: list[int], end: int):
        """Slot of each of the first ``end`` tokens of a sequence holding ``blocks``."""
        import torch

        bs = self.kv_plan.block_size
        j = torch.arange(end)
        return torch.tensor(blocks)[j // bs] * bs + j % bs

    def _forward(self, ids, positions, mask):
        import torch

        d = self._device
        mask = mask.to(d)
        if self._float_mask:
            mask = torch.zeros(mask.shape, dtype=self._dtype, device=d).masked_fill(~mask, torch.finfo(self._dtype).min)
        out = self.model(input_ids=ids.to(d), position_ids=positions.to(d), attention_mask=mask, cache=self._kv,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _prefill(self, group: list[_Request]) -> None:
        """Prefill ``group`` in one forward: left-padded, each row attending to its own tokens only."""
        import torch

        contexts = [r.context() for r in group]
        n, width = len(group), max(map(len, contexts))
        ids = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        write = torch.zeros(n, width, dtype=torch.long)  # padding writes to slot 0
        for i, (r, ctx) in enumerate(zip(group, contexts)):
            pad = width - len(ctx)
            ids[i, pad:] = torch.tensor(ctx)
            positions[i, pad:] = torch.arange(len(ctx))
            valid[i, pad:] = True
            write[i, pad:] = self._slots(r.blocks, len(ctx))
        mask = torch.ones(width, width, dtype=torch.bool).tril()[None]
        if not valid.all():  # causal over real tokens; a padding position sees itself (no empty mask row)
            mask = mask & valid[:, None, :] | torch.eye(width, dtype=torch.bool)
        self._kv.plan_forward(write.view(-1).to(self._device))
        try:
            logits = self._forward(ids, positions, mask[:, None])
        except Exception as e:  # e.g. out of memory on a long prompt: fail these, keep the batch
            log.exception("prefill failed")
            for r in group:
                self._fail(r, ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500))
            return
        with self._lock:
            self._stats.prompt_tokens += sum(map(len, contexts))
            self._stats.prefill_forwards += 1
        for r, ctx in zip(group, contexts):
            r.length = len(ctx)
        self._running += group
        self._sample(group, logits)
        self._drop_finished()

    def _decode(self) -> None:
        """One token for every running row, in one forward over their gathered blocks."""
        import torch

        rows, bs = self._running, self.kv_plan.block_size
        lengths = torch.tensor([r.length for r in rows])
        width = max(len(r.blocks) for r in rows)
        table = torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in rows])
        j = torch.arange(int(lengths.max()) + 1)
        valid = j[None, :] <= lengths[:, None]  # the row's tokens and the one being added
        slots = torch.where(valid, table[:, j // bs] * bs + j % bs, 0)
        write = slots.gather(1, lengths[:, None]).view(-1)
        self._kv.plan_forward(write.to(self._device), slots.to(self._device))
        logits = self._forward(torch.tensor([[r.last_token] for r in rows]), lengths[:, None],
                               valid[:, None, None, :])
        for r in rows:
            r.length += 1
        with self._lock:
            self._stats.decode_steps += 1
        self._sample(rows, logits)
        self._drop_finished()

    def _sample(self, rows: list[_Request], logits) -> None:
        """Next token of each row; a row whose scores are not finite or whose sampling fails fails alone."""
        import torch

        # one pass gives plain greedy rows their token (the first maximum, as argmax) and flags rows whose
        # best score is NaN or inf (NaN propagates through max)
        best, greedy = logits.max(dim=-1)
        finite, greedy = torch.isfinite(best).tolist(), greedy.tolist()
        for i, r in enumerate(rows):
            if not finite[i]:
                self._fail(r, ServeError("the model produced non-finite scores (inf/NaN) for this request; its "
                                         "generation was stopped", status=500))
                continue
            try:
                token = greedy[i] if _plain_greedy(r.seq.params) else r.seq.sample(logits[i])
            except GenerationError as e:  # this request's own settings broke sampling
                self._fail(r, InvalidRequest(f"sampling failed: {e}", param=e.param))
                continue
            except Exception as e:  # noqa: BLE001 - isolate the row, keep the batch
                log.exception("sampling failed for one request")
                self._fail(r, ServeError(f"sampling failed: {type(e).__name__}: {e}", status=500))
                continue
            self._emit(r, token)

    # ---- embeddings
    def _embed_chunk(self) -> None:
        """Embed inputs of the oldest jobs until ``embedding_chunk_tokens`` tokens are done (at least one input)."""
        budget = self.config.embedding_chunk_tokens
        while self._embeds and budget > 0:
            job = self._embeds[0]
            if job.future.cancelled():  # the client went away
                self._embeds.popleft()
                continue
            ids = job.inputs[len(job.vectors)]
            try:
                job.vectors.append(self._embed_one(ids))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._embeds.popleft()
                self._settle(job.future, exception=e)
                continue
            budget -= len(ids)
            if len(job.vectors) == len(job.inputs):
                self._embeds.popleft()
                self._settle(job.future, result=job.vectors)

    @staticmethod
    def _settle(future: concurrent.futures.Future, result: Any = None, exception: BaseException | None = None):
        try:
            future.set_exception(exception) if exception is not None else future.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    def _embed_one(self, ids: list[int]) -> list[float]:
        import torch

        hidden = self.model(input_ids=torch.tensor([ids], device=self._device), output_hidden_states=True,
                            use_cache=False, logits_to_keep=1).hidden_states[-1][0]
        return torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=-1).cpu().tolist()

    # ---- rows
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
            self._release(r)
            with self._lock:
                self._stats.requests_finished += 1

    def _release(self, r: _Request) -> None:
        self._blocks.free(r.blocks)
        r.blocks = []

    def _abort(self, r: _Request) -> None:
        r.seq.finish("abort")
        r.done = True
        self._release(r)
        with self._lock:
            self._stats.requests_aborted += 1

    def _fail(self, r: _Request, err: ServeError) -> None:
        r.done = True
        self._release(r)
        self._send(r, err)

    def _drop_finished(self) -> None:
        self._running = [r for r in self._running if not r.done]

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
