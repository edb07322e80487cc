"""The HF engine: iteration-level (continuous) batching over a Hugging Face model, KV paged by a budget.

Requests join the running batch between decode steps and leave as soon as they finish;
each keeps its own sampling settings, seed, stops and token budget (all in
:class:`vicuna.generation.Sequence`, the code single-request generation uses). This module
is the thread bridge and the loop: the model runs in one background thread; the asyncio
side hands requests in through a thread-safe queue and gets deltas back through
``loop.call_soon_threadsafe``. What runs is decided by :mod:`.scheduler` (queues, blocks,
preemption, the prefix cache; no torch) and run by :mod:`.runner` (the forwards). The
engine knows nothing of HTTP.

Each iteration: free what finished or was cancelled, run a bounded chunk of embedding
work, reserve the next slot of every running row (preempting if needed), admit waiting
requests and prefill them together in one left-padded forward, then decode every running
row in one forward. A row whose scores are not finite, or whose sampling fails, fails
alone; the others go on.

Why our own scheduler and not ``transformers``' ``init_continuous_batching``: on CPU the
latter packs every request into one sequence with a dense block-diagonal mask, which
measured at about half of static batching here and applies one set of sampling settings to
the whole batch. On CUDA at scale, use the vLLM backend (:mod:`vicuna.serve.engine.vllm`).
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

from ...errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, ModelNotFound, Overloaded, ServeError
from ...generation import SamplingParams, Sequence, prompt_logprob_entries
from ...sizes import format_size, parse_size
from .. import structured
from ..core import Delta, GenerateRequest
from .base import AdapterView, EngineBase, EngineConfig, EngineStats, Meter, drain_retry_after
from .kv import KVPlan, KVShape, default_budget
from .scheduler import Request, Scheduler

log = logging.getLogger(__name__)


@dataclass
class _EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future
    adapter: str | None = None
    vectors: list[list[float]] = field(default_factory=list)


def ngram_draft(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (n from ``max_n`` down to ``min_n``); empty when none recurs."""
    for n in range(min(max_n, len(tokens) - 1), max(min_n, 1) - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


class _Chunk:
    """A running row seen by :meth:`Runner.prefill` as a chunk to append: its next token and draft after the
    ``length`` tokens already in its KV blocks."""

    def __init__(self, r: Request, draft: list[int]):
        self.r, self.draft = r, draft
        self.blocks, self.cached, self.adapter = r.blocks, r.length, r.adapter

    def context(self) -> list[int]:
        return self.r.context() + self.draft


def _deliver(items: list[tuple[Request, Any]]) -> None:
    for r, item in items:
        r.queue.put_nowait(item)


def _settle(future: concurrent.futures.Future, result: Any = None, exception: BaseException | None = None):
    try:
        future.set_exception(exception) if exception is not None else future.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


class HFEngine(EngineBase):
    """Continuous-batching engine over a :class:`vicuna.model.LoadedModel`, its KV cache paged by a budget."""

    backend = "hf"
    supports_prompt_logprobs = True

    def __init__(self, loaded, config: EngineConfig | None = None, adapters: dict[str, str] | None = None):
        from .runner import Runner  # torch: loaded with the engine, not with the CLI

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
        self.runner = Runner(self.model, self.kv_plan)
        # Prefill groups. On CPU a prefill is compute-bound, so a big group makes every newcomer wait for all of
        # them: SmolLM2 at 16 streams (bfloat16, 2 cores), 2048 -> 256 tokens, with first tokens flushed before
        # the decode step, took time to first token p50 from 0.48 to 0.15 s and throughput from 254 to 283-338
        # tok/s (less padding). GPUs keep vLLM's 2048.
        prefill_tokens = self.config.max_prefill_tokens or (2048 if self._device.type == "cuda" else 256)
        self.scheduler = Scheduler(self.kv_plan.num_blocks, self.kv_plan.block_size,
                                   max_batch_size=self.config.max_batch_size, max_prefill_tokens=prefill_tokens,
                                   prefix_caching=self.config.prefix_caching)
        self._embeds: collections.deque[_EmbedJob] = collections.deque()
        self._cv = threading.Condition()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()  # the counters the loop keeps (the meter and the scheduler keep theirs)
        self._meter = Meter()
        self._finished_at: collections.deque[float] = collections.deque(maxlen=256)  # when requests finished
        self._step_time = 0.0
        self._lock = threading.Lock()
        # LoRA adapters served as models of their own: served name -> (peft adapter name, path). The peft name is
        # new at every load, so a reloaded adapter never meets the prefix-cache blocks of its predecessor.
        self.adapters: dict[str, tuple[str, str]] = {}
        self._adapter_ids = 0
        self._adapter_jobs: collections.deque[tuple[str, str, concurrent.futures.Future]] = collections.deque()
        self._retired: list[str] = []  # peft adapters unloaded from serving, deleted once no request uses them
        for name, path in (adapters or {}).items():
            self._attach(name, path)

    # ------------------------------------------------------------------ LoRA adapters
    def _attach(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` onto the one base model in memory, to serve as ``name``."""
        from pathlib import Path

        if not (Path(path) / "adapter_config.json").is_file():
            raise ModelLoadError(f"--lora {name}={path}: no adapter_config.json there; pass a PEFT adapter directory")
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelLoadError("--lora needs peft: pip install peft") from None
        self._adapter_ids += 1
        internal = f"lora-{self._adapter_ids}-{name}"
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=internal)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=internal)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"cannot apply the LoRA adapter {path} to {self.name}: {e}") from None
        self.model.eval()
        self.runner.set_model(self.model, base_adapter=self._base_adapter())
        self.adapters[name] = (internal, path)
        log.info("%s: LoRA adapter %s loaded from %s", self.name, name, path)

    def _base_adapter(self) -> str:
        """What peft calls the rows served under the engine's own name: a bare --lora PATH, else the base."""
        return "default" if "default" in getattr(self.model, "peft_config", {}) else "__base__"

    def adapter_views(self) -> dict[str, AdapterView]:
        return {name: AdapterView(self, name, path) for name, (_, path) in self.adapters.items()}

    async def load_adapter(self, name: str, path: str) -> AdapterView:
        """Load an adapter while serving (``POST /v1/load_lora_adapter``); done by the model thread between steps."""
        if name in self.adapters or name == self.name:
            raise InvalidRequest(f"a model named {name!r} is already served", param="lora_name")
        job = (name, path, concurrent.futures.Future())
        with self._cv:
            if self._thread is None:
                raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
            self._adapter_jobs.append(job)
            self._cv.notify()
        await asyncio.wrap_future(job[2])
        return AdapterView(self, name, path)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` now; its weights go once the requests already using it are done."""
        if name not in self.adapters:
            raise ModelNotFound.for_model(name, list(self.adapters))
        internal, _ = self.adapters.pop(name)
        with self._cv:
            self._retired.append(internal)
            self._cv.notify()

    def _adapter_work(self) -> None:
        """In the model thread (peft changes the modules a forward runs): loads asked for, unloads now unused."""
        while self._adapter_jobs:
            name, path, future = self._adapter_jobs.popleft()
            try:
                self._attach(name, path)
            except ModelLoadError as e:
                _settle(future, exception=InvalidRequest(str(e), param="lora_path"))
            else:
                _settle(future, result=True)
        if self._retired:
            sched = self.scheduler
            busy = {r.adapter for r in (*sched.running, *sched.waiting) if not r.done}
            for internal in [a for a in self._retired if a not in busy]:
                self.model.delete_adapter(internal)
                self._retired.remove(internal)
                log.info("%s: LoRA adapter %s unloaded", self.name, internal)

    def _adapter(self, name: str | None) -> str | None:
        """The peft name of served adapter ``name`` (None: the engine's own model)."""
        if name is None:
            return None
        try:
            return self.adapters[name][0]
        except KeyError:
            raise ModelNotFound.for_model(name, [self.name, *self.adapters]) from None

    def _plan_kv(self) -> tuple[KVPlan, str]:
        shape = KVShape.of(self.model.config, self._dtype)
        if self.config.kv_cache_memory is not None:
            budget, how = parse_size(self.config.kv_cache_memory), "--kv-cache-memory"
        else:
            budget, how = default_budget(self._device)
            how = f"default: {how}"
        return KVPlan.for_budget(shape, budget, self.config.block_size), how

    @property
    def _kv(self):
        return self.runner.kv

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

    # ------------------------------------------------------------------ requests (the asyncio side)
    async def generate(self, request: GenerateRequest, adapter: str | None = None) -> AsyncIterator[Delta]:
        """Stream deltas for one request (through LoRA ``adapter``, a served name). Closing the iterator aborts
        it in the engine."""
        internal = self._adapter(adapter)
        prompt_ids, params = self.prepare(request)
        stream = self.stream(prompt_ids, params, adapter=internal)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     adapter: str | None = None) -> AsyncIterator[Delta]:
        """Stream deltas for already validated prompt ids and settings (what ``generate`` runs); ``adapter``:
        the peft name of a loaded adapter."""
        if self._thread is None:
            raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
        queue: asyncio.Queue = asyncio.Queue()
        req = Request(list(prompt_ids), Sequence(self.tokenizer, prompt_ids, params), adapter=adapter,
                      loop=asyncio.get_running_loop(), queue=queue,
                      cache_prefix=params.prompt_logprobs is None)  # scoring needs every position computed
        if params.constraint is not None:  # structured outputs: this request's grammar state
            req.matcher = structured.Matcher(params.constraint, list(params.stop_token_ids))
        waiting = self.scheduler.waiting
        with self._cv:
            if len(waiting) >= self.config.max_queue:
                raise Overloaded(
                    f"the server is overloaded: {len(waiting)} requests already wait for {self.name}; "
                    "retry shortly", retry_after=self._retry_after())
            waiting.append(req)
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
        with self._lock:
            finished = list(self._finished_at)
        return drain_retry_after(len(self.scheduler.waiting), finished, time.perf_counter())

    async def embed(self, texts: list[str], adapter: str | None = None) -> tuple[list[list[float]], int]:
        """Mean-pooled last hidden state, L2-normalised; computed in bounded chunks between decode steps."""
        internal = self._adapter(adapter)
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
        job = _EmbedJob(ids, concurrent.futures.Future(), internal)
        with self._cv:
            if self._thread is None:
                raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
            self._embeds.append(job)
            self._cv.notify()
        return await asyncio.wrap_future(job.future), total

    # ------------------------------------------------------------------ state
    def stats(self) -> EngineStats:
        sched = self.scheduler
        with self._lock:
            s = EngineStats(**vars(self._stats))
        self._meter.fill(s)
        s.waiting, s.running = len(sched.waiting), len(sched.running)
        s.preemptions = sched.preemptions
        s.kv_blocks, s.kv_blocks_free = sched.pool.num_blocks, sched.pool.num_free
        s.prefix_cache_queries, s.prefix_cache_hits = sched.prefix_queries, sched.prefix_hits
        s.prefix_cache_evictions = sched.pool.evictions
        return s

    @property
    def queue_length(self) -> int:
        return len(self.scheduler)

    def info(self) -> dict[str, Any]:
        t = self.template
        return {
            "model": self.name, "backend": self.backend, "context_length": self.max_model_len,
            "conv_template": getattr(t, "name", "jinja"), "device": self.loaded.device,
            "dtype": str(self._dtype).removeprefix("torch."),
            "num_parameters": self.loaded.num_parameters, "max_batch_size": self.config.max_batch_size,
            "max_queue": self.config.max_queue, "kv_cache_tokens": self.kv_plan.tokens,
            "kv_cache_bytes": self.kv_plan.bytes, "kv_block_size": self.kv_plan.block_size,
            "prefix_caching": self.scheduler.prefix_caching,
            "lora_adapters": {name: path for name, (_, path) in self.adapters.items()},
        }

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        import torch

        sched = self.scheduler
        with torch.inference_mode():
            self._warm_up()
            while True:
                with self._cv:
                    while not (self._stopping or sched.waiting or sched.running or self._embeds
                               or self._adapter_jobs or self._retired):
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # a fault of the whole step: fail what was in it, keep serving
                    log.exception("engine step failed")
                    err = ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500)
                    for r in sched.running:
                        self._fail(r, err)
                    sched.running.clear()
                    self._flush()
        stopped = ServeError("the engine stopped", status=503, code="model_unavailable")
        for r in sched.running + list(sched.waiting):
            self._fail(r, stopped)
        sched.running.clear()
        sched.waiting.clear()
        self._flush()
        while self._embeds:
            _settle(self._embeds.popleft().future, exception=stopped)
        while self._adapter_jobs:
            _settle(self._adapter_jobs.popleft()[2], exception=stopped)

    def _warm_up(self) -> None:
        """One tiny prefill and decode at start, so the first request does not pay the kernels' set-up."""
        pool = self.scheduler.pool
        blocks = pool.allocate(self.kv_plan.blocks_for(9))
        if blocks is None:
            return
        try:
            self.runner.warm_up(blocks)
        except Exception:  # noqa: BLE001 - a failed warm-up is only slower; real requests report errors
            log.warning("engine warm-up failed", exc_info=True)
        finally:
            pool.free(blocks)

    def _iteration(self) -> None:
        sched = self.scheduler
        self._step_time = time.perf_counter()  # tokens of one iteration share one rate entry
        for r in sched.running:
            if r.cancelled and not r.done:
                self._abort(r)
        sched.drop_finished()
        self._adapter_work()
        self._embed_chunk()
        preempted = sched.reserve_decode_slots()
        group, cancelled = ([], []) if preempted else sched.admit()  # vLLM: no newcomers in a step that preempted
        for r in cancelled:
            self._abort(r)
        if group:
            self._prefill(group)
            self._flush()  # their first tokens go out now, not after the decode step
        if sched.running:
            self._decode()
        self._flush()

    def _prefill(self, group: list[Request]) -> None:
        # prompt logprobs (scoring): every position's logits, kept only in a group that holds such a request
        scoring = [r.seq.params.prompt_logprobs is not None and r.seq.prompt_logprobs is None for r in group]
        try:
            logits = self.runner.prefill(group, all_logits=any(scoring))
        except Exception as e:  # e.g. out of memory on a long prompt: fail these, keep the batch
            log.exception("prefill failed")
            for r in group:
                self._fail(r, ServeError(f"internal engine error: {type(e).__name__}: {e}", status=500))
            return
        with self._lock:
            self._stats.prompt_tokens += sum(r.context_length - r.cached for r in group)
            self._stats.prefill_forwards += 1
        for r in group:
            r.length = r.context_length
        if any(scoring):
            width = logits.shape[1]
            for i, r in enumerate(group):
                if scoring[i]:  # admitted with cache_prefix=False: its whole context is in this forward
                    ctx = r.context()
                    r.seq.prompt_logprobs = prompt_logprob_entries(self.tokenizer, ctx, logits[i, width - len(ctx):],
                                                                   r.seq.params.prompt_logprobs)
            logits = logits[:, -1]
        self.scheduler.running_added(group)
        scored_only = [r for r in group if r.seq.params.max_new_tokens == 0]
        for r in scored_only:  # max_tokens=0: the prompt's scores are the whole answer
            r.seq.finish("length")
            self._emit(r, None)
        self._sample([r for r in group if not r.done], logits[[i for i, r in enumerate(group) if not r.done]]
                     if scored_only else logits)

    def _decode(self) -> None:
        """One token for every running row, in one forward over their gathered blocks."""
        rows = self.scheduler.running
        drafts = self._drafts(rows) if self.config.speculative == "ngram" else None
        if drafts is not None and any(drafts):
            return self._verify(rows, drafts)
        logits = self.runner.decode(rows)
        for r in rows:
            r.length += 1
            self.scheduler.computed(r)
        with self._lock:
            self._stats.decode_steps += 1
        self._sample(rows, logits)

    # ---- speculative decoding (prompt lookup)
    def _drafts(self, rows: list[Request]) -> list[list[int]]:
        """Each row's n-gram draft (empty for rows that do not speculate), its KV blocks already reserved.

        Only plain greedy rows speculate: accepting a draft token is exact there (it equals the argmax the
        row would have taken), while sampled, logprob or grammar rows would need rejection sampling."""
        from .runner import _plain_greedy  # the rule the batched argmax already serves

        cfg, sched = self.config, self.scheduler
        out: list[list[int]] = []
        for r in rows:
            p = r.seq.params
            room = p.max_new_tokens - len(r.seq.output_ids) - 1  # the model's own token comes on top
            draft = []
            if r.matcher is None and _plain_greedy(p) and room > 0:
                draft = ngram_draft(r.context(), min(cfg.num_speculative_tokens, room), cfg.prompt_lookup_max,
                                    cfg.prompt_lookup_min)
            if draft:  # slots for the draft after the reserved one of the next token; none free: no draft
                need = sched.blocks_for(r.length + 1 + len(draft)) - len(r.blocks)
                extra = sched.pool.allocate(need) if need > 0 else []
                if extra is None:
                    draft = []
                else:
                    r.blocks += extra  # kept for the next steps (or given back on release) when rejected
            out.append(draft)
        return out

    def _verify(self, rows: list[Request], drafts: list[list[int]]) -> None:
        """One forward over every row's next token and its draft (a chunked append into the paged KV); each
        speculating row keeps its draft's longest prefix equal to the model's greedy tokens, plus the model's
        token after it; the others take their next token as in plain decoding."""
        import torch

        from .runner import non_finite_error

        # a failure here is a failed decode step: the loop fails the running rows and goes on
        logits = self.runner.prefill([_Chunk(r, d) for r, d in zip(rows, drafts)], all_logits=True)
        width = logits.shape[1]
        with self._lock:
            self._stats.decode_steps += 1
        plain = [i for i, d in enumerate(drafts) if not d]
        for i, (r, draft) in enumerate(zip(rows, drafts)):
            if not draft:
                continue
            scores = logits[i, width - len(draft) - 1:]
            best, greedy = scores.max(dim=-1)
            if not bool(torch.isfinite(best).all()):
                self._fail(r, non_finite_error())
                continue
            greedy = greedy.tolist()
            accepted = 0
            while accepted < len(draft) and draft[accepted] == greedy[accepted]:
                accepted += 1
            with self._lock:
                self._stats.spec_draft_tokens += len(draft)
                self._stats.spec_accepted_tokens += accepted
            base = r.length
            for token in draft[:accepted] + [greedy[accepted]]:  # stops, EOS and max_tokens as in plain decoding
                self._emit(r, token)
                if r.done:
                    break
            if not r.done:  # the KV keeps the accepted tokens only; rejected slots are overwritten later
                r.length = base + 1 + accepted
                self.scheduler.computed(r)
        if plain:
            rest = [rows[i] for i in plain]
            for r in rest:
                r.length += 1
                self.scheduler.computed(r)
            self._sample(rest, logits[plain, -1])
        self.scheduler.drop_finished()

    def _sample(self, rows: list[Request], logits) -> None:
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:  # structured outputs: forbid what each grammar does not allow; other rows untouched
            logits = self._mask_logits(rows, logits, constrained)
        for r, token in zip(rows, self.runner.sample(rows, logits)):
            if isinstance(token, ServeError):
                self._fail(r, token)
            elif r.matcher is not None and not r.matcher.accept(token):  # advance the grammar
                self._fail(r, ServeError("the sampled token breaks the request's grammar", status=500))
            else:
                self._emit(r, token)
        self.scheduler.drop_finished()

    def _mask_logits(self, rows: list[Request], logits, constrained: list[int]):
        """Logits with each constrained row's forbidden tokens at -inf (timed per step)."""
        started = time.perf_counter()
        bitmask = structured.allocate_bitmask(len(rows), logits.shape[-1])
        for i in constrained:
            rows[i].matcher.fill_mask(bitmask, i)
        logits = logits.float()  # the CPU kernel takes float32; sampling works in float32 anyway
        structured.apply_masks(logits, bitmask, constrained)
        with self._lock:
            self._stats.mask_seconds += time.perf_counter() - started
            self._stats.mask_steps += 1
        return logits

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
                job.vectors.append(self.runner.embed(ids, job.adapter))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._embeds.popleft()
                _settle(job.future, exception=e)
                continue
            budget -= len(ids)
            if len(job.vectors) == len(job.inputs):
                self._embeds.popleft()
                _settle(job.future, result=job.vectors)

    # ---- rows
    def _emit(self, r: Request, token: int | None) -> None:
        """Deliver what ``token`` releases (None: nothing sampled, the sequence was finished otherwise)."""
        seq = r.seq
        text = seq.append(token) if token is not None else ""
        now = time.perf_counter()
        if token is not None:
            r.last_token = token
            self._meter.tokens(1, at=self._step_time)
        logprobs = None
        if seq.params.logprobs is not None and len(seq.logprobs) > r.logprobs_sent:
            logprobs = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top}
                        for lp in seq.logprobs[r.logprobs_sent:]]
            r.logprobs_sent = len(seq.logprobs)
        if r.matcher is not None and r.matcher.is_terminated() and not seq.finished:
            text += seq.finish("stop")  # structured outputs: the grammar is complete
        prompt_lps = None
        if seq.prompt_logprobs is not None and not r.prompt_logprobs_sent:
            prompt_lps, r.prompt_logprobs_sent = seq.prompt_logprobs, True
        if text or seq.finished or logprobs or prompt_lps:
            if r.first_token_at is None:
                r.first_token_at = now
                self._meter.first_token(now - r.arrival)
            self._send(r, Delta(text, seq.finish_reason, len(r.prompt_ids), len(seq.output_ids), logprobs,
                                prompt_lps))
        if seq.finished:
            r.done = True
            self.scheduler.release(r)
            with self._lock:
                self._stats.requests_finished += 1
                self._finished_at.append(now)

    def _abort(self, r: Request) -> None:
        r.seq.finish("abort")
        r.done = True
        self.scheduler.release(r)
        with self._lock:
            self._stats.requests_aborted += 1

    def _fail(self, r: Request, err: ServeError) -> None:
        r.done = True
        self.scheduler.release(r)
        self._send(r, err)

    def _send(self, r: Request, item: Any) -> None:
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
