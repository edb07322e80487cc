"""What every engine backend shares: the model and engine settings, request preparation, the meter.

:class:`ModelConfig` lives here, not in :mod:`vicuna.serve.launch`, so that the backends
(which read it) and the launcher (which builds them) import in one direction only:
``launch -> engine.{hf,vllm,llamacpp} -> engine.base``.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...conversation import TemplateError, encode, render_prompt
from ...errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, ServeError, UsageError
from ...generation import (DEFAULT_MAX_NEW_TOKENS, ContextLengthError, GenerationError, ModelDefaults,
                           SamplingParams, fit_max_new_tokens, sampling_params)
from ...model import (AUTO_DTYPE_HELP, DEFAULT_MODEL_NAME, DEVICES, DTYPES, QUANTIZATION_HELP, QUANTIZATIONS,
                      check_quantization)
from ...sizes import parse_size
from .. import structured
from ..core import GenerateRequest

BACKENDS = ("hf", "llamacpp", "vllm")


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelConfig:
    """What to serve and how to load it. Every field is a flag of the serving commands."""

    model_path: str | None = _f(None, f"Hugging Face model directory, or a .gguf file with --backend llamacpp "
                                      f"(default: {DEFAULT_MODEL_NAME}, imported by `make install`, or its GGUF with "
                                      "--backend llamacpp; 'demo': the tiny bundled demo model)", metavar="PATH")
    model_name: str | None = _f(None, "name to serve the model as (default: the directory or file name)",
                                metavar="NAME")
    backend: str = _f("hf", "hf: our continuous-batching engine over transformers (CPU/CUDA); llamacpp: a GGUF "
                            "file through llama.cpp (CPU/Metal, pip install -e '.[llamacpp]'); vllm: vLLM (CUDA, "
                            "pip install -e '.[gpu]')", choices=BACKENDS)
    lora: tuple[str, ...] = _f((), "a PEFT LoRA adapter on top of --model-path: PATH serves the model with the "
                                   "adapter applied, under the model's name (with several --model-path, on each); "
                                   "NAME=PATH serves it as model NAME beside the base, which stays servable under "
                                   "its own name (hf, vllm; one base in memory, rows of different adapters decoded "
                                   "together); repeat for several adapters, e.g. --lora math=out/math "
                                   "--lora code=out/code", metavar="[NAME=]PATH", append=True)
    conv_template: str | None = _f(None, "conversation template (see `vicuna templates list`); default: the "
                                         "tokenizer's chat_template, then a match on the model name")
    device: str = _f("auto", "where to run the model (hf backend)", choices=DEVICES)
    dtype: str = _f("auto", AUTO_DTYPE_HELP, choices=DTYPES)
    num_gpus: int = _f(1, "split the model over this many GPUs (hf: device map; vllm: tensor parallel)")
    max_gpu_memory: str | None = _f(None, "GPU memory the model may use per GPU, e.g. 20GiB (hf: device-map cap; "
                                          "vllm: its gpu_memory_utilization)", metavar="SIZE")
    load_8bit: bool = _f(False, "8-bit weights (hf: bitsandbytes; vllm: online FP8 quantization); CUDA only")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")
    quantization: str = _f("none", QUANTIZATION_HELP, choices=QUANTIZATIONS)
    threads: int | None = _f(None, "CPU threads for --backend llamacpp (default: llama.cpp's, the physical cores)",
                             metavar="N")

    def __post_init__(self):
        self.lora = (self.lora,) if isinstance(self.lora, str) else tuple(self.lora or ())
        bare = [x for x in self.lora if lora_spec(x)[0] is None]
        if len(bare) > 1:
            raise UsageError(f"{len(bare)} bare --lora PATH given ({', '.join(bare)}); one adapter can be applied "
                             "to the model itself: name the others, --lora NAME=PATH, to serve each as its own model")
        names = [lora_spec(x)[0] for x in self.lora if lora_spec(x)[0] is not None]
        if len(set(names)) < len(names):
            raise UsageError(f"two --lora adapters are named alike ({', '.join(names)}); give distinct NAMEs")
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.num_gpus < 1 or (self.threads is not None and self.threads < 1):
            raise UsageError("--num-gpus and --threads must be >= 1")
        try:  # bad combinations are bad usage (exit 2), found before any weight is read
            check_quantization(self.quantization, load_8bit=self.load_8bit, lora=bool(self.lora),
                               num_gpus=self.num_gpus)
        except ModelLoadError as e:
            raise UsageError(str(e)) from None
        if self.quantization != "none" and self.backend != "hf":
            raise UsageError(f"--quantization {self.quantization} is for the hf backend; --backend llamacpp takes "
                             "a quantized GGUF file, --backend vllm --load-8bit quantizes to FP8")
        if self.backend == "vllm" and not self.model_path:
            raise UsageError("--backend vllm needs --model-path (a Hugging Face model directory or hub id)")

    @property
    def served_name(self) -> str:
        """The name clients use: --model-name, else the directory or file name."""
        if self.model_name:
            return self.model_name
        if not self.model_path:
            return DEFAULT_MODEL_NAME
        path = Path(str(self.model_path).rstrip("/"))
        return path.stem if path.suffix == ".gguf" else path.name

    @property
    def applied_lora(self) -> str | None:
        """The bare ``--lora PATH``: applied to the model, served under its name (what --lora always meant)."""
        return next((x for x in self.lora if lora_spec(x)[0] is None), None)

    @property
    def lora_adapters(self) -> dict[str, str]:
        """``--lora NAME=PATH`` adapters by served name."""
        return dict(spec for spec in map(lora_spec, self.lora) if spec[0] is not None)


def lora_spec(text: str) -> tuple[str | None, str]:
    """``"NAME=PATH"`` -> (NAME, PATH); a bare ``"PATH"`` (or one whose '=' sits inside a path) -> (None, PATH)."""
    name, sep, path = str(text).partition("=")
    if sep and name and path and "/" not in name and "\\" not in name:
        return name, path
    return None, str(text)


@dataclass
class EngineConfig:
    """Scheduler and memory limits. Every field is a flag of the serving commands (``--kv-cache-memory``
    ...), generated by :mod:`vicuna.serve.launch` from the ``help`` in its metadata."""

    max_batch_size: int = field(default=32, metadata={
        "help": "most sequences decoded together (1 = one request at a time); memory is set by --kv-cache-memory"})
    max_queue: int = field(default=256, metadata={
        "help": "requests that may wait for the batch; more are refused with 429 + Retry-After"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "prompt + completion token limit (default: the model's context length, at most what the KV "
                "cache holds)"})
    default_max_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={
        "help": "completion budget when a request sets none"})
    max_prefill_tokens: int | None = field(default=None, metadata={
        "help": "prompt tokens (padding included) prefilled together in one forward; bounds how long "
                "decoding pauses for newcomers and how long the first of them waits (one longer prompt still "
                "runs alone); default: 256 on CPU, 2048 on GPU"})
    kv_cache_memory: str | None = field(default=None, metadata={
        "help": "KV cache budget, e.g. 4GiB or 512MiB (KiB/MiB/GiB are powers of 1024, K/M/G and KB/MB/GB of "
                "1000, as in Hugging Face); default: on CUDA up to 90 percent of the GPU less what is already in "
                "use, on CPU min(a quarter of available RAM, 4 GiB)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    speculative: str | None = field(default=None, metadata={"choices": ["ngram"], "help":
        "speculative decoding (hf engine): 'ngram' drafts the next tokens by prompt lookup (the last n tokens "
        "found earlier in prompt + answer; what followed them) and verifies them in one forward; only plain "
        "greedy rows (temperature 0, no logprobs, no structured output) speculate; outputs are unchanged"})
    num_speculative_tokens: int = field(default=4, metadata={
        "help": "--speculative: most draft tokens verified per row and step"})
    prompt_lookup_max: int = field(default=3, metadata={
        "help": "--speculative ngram: longest n-gram looked up (tried first)"})
    # 2, not 1: a single token recurs almost anywhere, so min 1 drafts on nearly every step and is mostly
    # rejected on open text (benchmarks/speculative.py, float32: 0.70x plain on an open question at 1, ~1x at 2)
    prompt_lookup_min: int = field(default=2, metadata={
        "help": "--speculative ngram: shortest n-gram looked up"})
    prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV cache of prompt prefixes already computed (a shared system prompt, the earlier "
                "turns of a chat), block by block; outputs are the same either way (hf: our prefix cache; "
                "vllm: enable_prefix_caching; llamacpp: cache_prompt); --no-prefix-caching turns it off"})
    max_embedding_inputs: int = field(default=256, metadata={
        "help": "most inputs one /v1/embeddings request may carry (more: 400)"})
    max_embedding_tokens: int = field(default=65536, metadata={
        "help": "most tokens one /v1/embeddings request may carry, all inputs together (more: 400)"})
    embedding_chunk_tokens: int = field(default=512, metadata={
        "help": "embedding tokens computed between two decode steps (bounds the pause embeddings cause)"})

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_prefill_tokens", "block_size",
                     "max_embedding_inputs", "max_embedding_tokens", "embedding_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ServeError(f"engine setting {name} must be >= 1, got {getattr(self, name)}", status=500)
        if self.kv_cache_memory is not None:
            parse_size(self.kv_cache_memory)  # fail at startup on an unreadable size
        if self.speculative is not None:
            if self.speculative != "ngram":
                raise UsageError(f"--speculative {self.speculative!r} is not known; use ngram")
            if self.num_speculative_tokens < 1 or self.prompt_lookup_min < 1:
                raise UsageError("--num-speculative-tokens and --prompt-lookup-min must be >= 1")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise UsageError(f"--prompt-lookup-min {self.prompt_lookup_min} is above --prompt-lookup-max "
                                 f"{self.prompt_lookup_max}")


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # tokens prefilled, prefix-cache hits excluded (a preempted request's are counted again)
    tokens_per_second: float = 0.0  # over the last few seconds
    ttft_count: int = 0  # time to first token, summed, for a mean
    ttft_sum: float = 0.0
    decode_steps: int = 0
    prefill_forwards: int = 0
    preemptions: int = 0
    kv_blocks: int = 0  # usable blocks of the KV cache
    kv_blocks_free: int = 0  # free blocks, cached prefixes waiting for reuse included
    prefix_cache_queries: int = 0  # context tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found there (not recomputed)
    prefix_cache_evictions: int = 0  # cached blocks reused for other tokens (under memory pressure)
    mask_seconds: float = 0.0  # structured outputs: time spent filling and applying token masks
    mask_steps: int = 0
    spec_draft_tokens: int = 0  # --speculative: draft tokens verified
    spec_accepted_tokens: int = 0  # of them, accepted (equal to the model's own greedy token)


class Meter:
    """Generated tokens, tokens/s over the last ``window`` seconds and time to first token — the counters
    every backend reports the same way (our engine per decode step, the external ones per streamed chunk)."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.generated_tokens = 0
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._lock = threading.Lock()

    def tokens(self, n: int, at: float | None = None) -> None:
        """``n`` tokens generated at ``at`` (default now); tokens given the same ``at`` share one entry."""
        now = time.perf_counter()
        at = now if at is None else at
        with self._lock:
            self.generated_tokens += n
            if self._rate and self._rate[-1][0] == at:
                self._rate[-1] = (at, self._rate[-1][1] + n)
            else:
                self._rate.append((at, n))
            while self._rate and now - self._rate[0][0] > self.window:
                self._rate.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_count += 1
            self.ttft_sum += seconds

    def fill(self, stats: EngineStats) -> EngineStats:
        """``stats`` with the meter's fields set."""
        now = time.perf_counter()
        with self._lock:
            window = [(t, n) for t, n in self._rate if now - t <= self.window]
            stats.generated_tokens, stats.ttft_count, stats.ttft_sum = (
                self.generated_tokens, self.ttft_count, self.ttft_sum)
        if window:
            stats.tokens_per_second = sum(n for _, n in window) / max(now - window[0][0], 1e-3)
        return stats


def drain_retry_after(waiting: int, finished_at: list[float], now: float, window: float = 30.0) -> float:
    """Seconds until a queue of ``waiting`` requests has drained, at the rate requests finished lately (the
    Retry-After of a 429). A burst that drains in 2 s is told 1-2 s, not a fixed 30; with no recent
    finishes to measure, a short guess. Bounded to [1, 60] s."""
    recent = [t for t in finished_at if now - t <= window]
    if len(recent) < 2:
        return 2.0
    rate = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)  # requests per second
    return round(min(60.0, max(1.0, waiting / rate)), 1)


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
    supports_prompt_logprobs = False  # scoring the prompt needs every position's logits (the hf engine has them)

    def prepare(self, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """Render, tokenize and validate; every failure is a 400 naming the parameter."""
        if request.prompt_logprobs is not None and not self.supports_prompt_logprobs:
            raise InvalidRequest(f"prompt logprobs (echo with logprobs, prompt_logprobs) are not served by the "
                                 f"{getattr(self, 'backend', '?')} backend; use --backend hf",
                                 param="prompt_logprobs")
        tok = self.tokenizer
        if request.messages is not None:
            if not isinstance(request.messages, list) or not request.messages:
                raise InvalidRequest("messages must be a non-empty list of {role, content} objects",
                                     param="messages")
            try:
                ids = encode(tok, render_prompt(self.template, request.messages, tok, tools=request.tools))
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
                strip_leading=request.messages is not None, prompt_logprobs=request.prompt_logprobs,
            )
        except ContextLengthError as e:
            raise ContextLengthExceeded(str(e), param=where) from None
        except GenerationError as e:
            raise InvalidRequest(str(e), param=e.param) from None
        # structured outputs: compile the constraint once per schema (a bad one is a 400 naming its field)
        if request.constraint is not None:
            if request.ignore_eos:
                raise InvalidRequest("ignore_eos cannot be combined with a structured output", param="ignore_eos")
            params.constraint = self.grammars.compile(request.constraint)
        return ids, params

    @functools.cached_property
    def grammars(self) -> structured.GrammarCache:
        """Compiled grammars for this engine's tokenizer (built on first use: the vocabulary scan takes ~0.1 s)."""
        config = getattr(getattr(self, "model", None), "config", None)
        return structured.GrammarCache(self.tokenizer, vocab_size=getattr(config, "vocab_size", None))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def tokenize(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                 add_special_tokens: bool | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The ids ``/tokenize`` reports: a prompt as ``prepare`` encodes it (special tokens by default), or
        messages rendered through the template (whose text already holds the special tokens)."""
        tok = self.tokenizer
        if messages is not None:
            try:
                text = render_prompt(self.template, messages, tok, add_generation_prompt=add_generation_prompt)
            except (TemplateError, KeyError, TypeError, AttributeError) as e:
                raise InvalidRequest(f"invalid messages: {e}", param="messages") from None
            return list(tok(text, add_special_tokens=bool(add_special_tokens))["input_ids"])
        return list(tok(prompt or "", add_special_tokens=add_special_tokens is not False)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        vocab = len(self.tokenizer)
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"tokens[{bad}] = {tokens[bad]} is not a token id of this model (0 to {vocab - 1})",
                                 param=f"tokens[{bad}]")
        return self.tokenizer.decode(tokens)


def served(engine) -> dict[str, Any]:
    """What ``engine`` serves by model name: itself, and a view per LoRA adapter it holds."""
    views = engine.adapter_views() if hasattr(engine, "adapter_views") else {}
    return {engine.name: engine, **views}


class AdapterView:
    """A LoRA adapter of an engine, served as a model of its own (``--lora NAME=PATH``).

    Everything is the engine's — the one base model, its KV cache, its batch, its queue — except the
    name clients use and the adapter applied to their rows, so the front ends (the API, ``/v1/models``,
    the worker and the controller's model list, the web UI and the arena) treat it as one more model.
    Its ``stats`` are the engine's (the metrics count an engine once, under its own name).
    """

    def __init__(self, engine, name: str, path: str):
        self.engine, self.name, self.path = engine, name, path

    backend = property(lambda self: self.engine.backend)
    tokenizer = property(lambda self: self.engine.tokenizer)
    template = property(lambda self: self.engine.template)
    defaults = property(lambda self: self.engine.defaults)
    config = property(lambda self: self.engine.config)
    max_model_len = property(lambda self: self.engine.max_model_len)
    queue_length = property(lambda self: self.engine.queue_length)
    base_engine = property(lambda self: self.engine)
    supports_prompt_logprobs = property(lambda self: self.engine.supports_prompt_logprobs)

    async def generate(self, request: GenerateRequest):
        stream = self.engine.generate(request, adapter=self.name)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def embed(self, texts: list[str]):
        return await self.engine.embed(texts, adapter=self.name)

    def prepare(self, request: GenerateRequest):
        return self.engine.prepare(request)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def tokenize(self, **kw) -> list[int]:
        return self.engine.tokenize(**kw)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def info(self) -> dict[str, Any]:
        return {**self.engine.info(), "model": self.name, "base_model": self.engine.name, "lora": self.path}

    def start(self) -> "AdapterView":
        return self

    def stop(self) -> None:
        """Nothing: the engine is stopped by whoever started it."""
