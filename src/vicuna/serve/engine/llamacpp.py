"""llama.cpp backend (``--backend llamacpp``): GGUF files on CPUs and Macs, behind the engine interface.

Through ``xllamacpp`` (optional extra ``.[llamacpp]``: prebuilt wheels that embed llama.cpp's
own server with its continuous batching). We call that server in process — no HTTP hop:
``Server.handle_completions(body, callback)`` blocks a thread of ours and calls back once per
streamed chunk, already parsed; returning True from the callback cancels the request, which
is how a client that goes away frees its slot.

What stays ours, so the API answers as it does with the hf backend: the prompt (our template
renders it and our tokenizer — the GGUF's own vocabulary read by transformers — encodes it;
llama.cpp gets token ids), validation and sampling defaults (:meth:`EngineBase.prepare`),
admission, counters and the chat answers' leading-space strip. What llama.cpp does: sampling
with the request's settings (temperature, top-p/k, penalties, seed), stop strings, stopping on
its end-of-generation tokens (EOS and the end-of-turn tokens it knows, which cover the
templates' stop tokens), detokenization and logprobs. Two differences are documented in
docs/serving.md: presence/frequency penalties also count prompt tokens, and embeddings are
not served (400).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from ...conversation import TemplateError, resolve_template
from ...errors import ModelLoadError, ServeError, UsageError
from ...generation import ModelDefaults, SamplingParams
from ...model import model_defaults
from ...sizes import parse_size
from .. import structured
from ..core import Delta, GenerateRequest
from .base import EngineConfig, ModelConfig
from .external import ExternalEngine, LeadingStrip

log = logging.getLogger(__name__)

INSTALL = "pip install -e '.[llamacpp]' (or pip install xllamacpp)"
# Sampler order as in transformers and vLLM (temperature before the truncations); llama.cpp's
# default puts top-k/top-p first and adds min-p 0.05, which changes what a temperature means.
SAMPLERS = ["penalties", "temperature", "top_k", "top_p"]
DEFAULT_KV_BYTES = 2 << 30  # KV budget when --kv-cache-memory is not given: 2 GiB (f16 cells)
_END = object()


def completion_body(prompt_ids: list[int], p: SamplingParams, cache_prompt: bool = True) -> dict[str, Any]:
    """llama.cpp's completion request for our validated settings (its native parameter names); ``cache_prompt``:
    reuse the slot's KV of a common prefix (``--prefix-caching``, on by default)."""
    body: dict[str, Any] = {
        "prompt": list(prompt_ids), "n_predict": p.max_new_tokens, "stream": True, "cache_prompt": cache_prompt,
        "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": 0.0, "typical_p": 1.0,
        "repeat_penalty": p.repetition_penalty, "repeat_last_n": 1 << 30,  # the whole context, like HF
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "stop": list(p.stop), "ignore_eos": p.ignore_eos, "samplers": SAMPLERS,
    }
    if p.seed is not None:
        body["seed"] = p.seed % 2**32  # llama.cpp seeds are 32-bit
    if p.logprobs is not None:
        body["n_probs"] = max(1, p.logprobs)  # the chosen token's logprob comes with the top list
    return body


def parse_chunk(chunk: dict[str, Any], top_k: int | None) -> tuple[str, str | None, list[dict] | None, int | None]:
    """One streamed chunk -> (text, finish_reason, our logprob entries, completion tokens when final).

    Raises :class:`ServeError` for an error chunk, with llama.cpp's status and message.
    """
    err = chunk.get("error") if isinstance(chunk.get("error"), dict) else (chunk if "choices" not in chunk else None)
    if err is not None:
        status = err.get("code") if isinstance(err.get("code"), int) else 500
        raise ServeError(f"llama.cpp: {err.get('message', err)}", status=status if 400 <= status < 600 else 500)
    choice = (chunk.get("choices") or [{}])[0]
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content") if top_k is not None else None
    if content:
        logprobs = [{"token": c.get("token", ""), "logprob": float(c.get("logprob", 0.0)),
                     "top": [(t.get("token", ""), float(t.get("logprob", 0.0)))
                             for t in (c.get("top_logprobs") or [])[:top_k]]} for c in content]
    usage = chunk.get("usage") or {}
    return choice.get("text") or "", choice.get("finish_reason"), logprobs, usage.get("completion_tokens")


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The few GGUF header fields we need: architecture, context length, KV bytes per token (f16)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str, default=None):
        f = fields.get(key)
        return f.contents() if f is not None else default

    arch = value("general.architecture", "llama")
    layers = int(value(f"{arch}.block_count", 0))
    heads = int(value(f"{arch}.attention.head_count", 1) or 1)
    kv_heads = int(value(f"{arch}.attention.head_count_kv", heads) or heads)
    head_dim = int(value(f"{arch}.attention.key_length", 0) or int(value(f"{arch}.embedding_length", 0)) // heads)
    return {"architecture": arch, "context_length": int(value(f"{arch}.context_length", 2048)),
            "kv_bytes_per_token": max(1, layers * 2 * kv_heads * head_dim * 2)}


def tokenizer_cache(path: Path) -> Path:
    """Where the tokenizer transformers converts from a GGUF file is kept (keyed by size and mtime)."""
    st = path.stat()
    home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vicuna" / "gguf-tokenizers"
    return home / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"


def load_gguf_tokenizer(path: Path) -> tuple[Any, dict[str, Any]]:
    """The GGUF file's own vocabulary as a transformers tokenizer, plus :func:`gguf_metadata`.

    Converting it takes transformers several seconds (it parses the whole file), so the result is
    cached; a failing cache write only costs the next start that time again.
    """
    from transformers import AutoTokenizer

    cache = tokenizer_cache(path)
    if (cache / "gguf-metadata.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache)), json.loads((cache / "gguf-metadata.json").read_text())
    meta = gguf_metadata(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the tokenizer of {path}: {e}") from None
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "gguf-metadata.json").write_text(json.dumps(meta))
        os.replace(tmp, cache)
    except OSError as e:
        log.debug("not caching the tokenizer of %s: %s", path, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, meta


def check_options(model: ModelConfig) -> Path:
    """The GGUF file to load; refuses the options llama.cpp would silently ignore here."""
    refused = [(model.lora, "--lora (merge the adapter first: vicuna weights merge-lora, then convert to GGUF)"),
               (model.load_8bit, "--load-8bit (the GGUF file's quantization decides the weights' format)"),
               (model.dtype != "auto", "--dtype (the GGUF file's quantization decides the weights' format)"),
               (model.device not in ("auto", "cpu"), "--device (the xllamacpp wheel decides: CPU/Metal here)"),
               (model.num_gpus != 1 or model.max_gpu_memory, "--num-gpus/--max-gpu-memory")]
    for given, what in refused:
        if given:
            raise UsageError(f"--backend llamacpp does not take {what}")
    if not model.model_path:
        from ...weights.gguf import default_gguf

        return default_gguf()
    path = Path(str(model.model_path)).expanduser()
    if not path.is_file():
        hint = " (a directory: --backend llamacpp takes a .gguf file; use --backend hf for a Hugging Face " \
               "folder)" if path.is_dir() else ""
        raise ModelLoadError(f"model path {str(path)!r} is not a file{hint}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic); convert it with llama.cpp's "
                                 "convert_hf_to_gguf.py, or serve the Hugging Face folder with --backend hf")
    return path


class LlamaCppEngine(ExternalEngine):
    backend = "llamacpp"

    def __init__(self, server, *, name: str, tokenizer, template, context_length: int, config: EngineConfig,
                 defaults: ModelDefaults):
        self.server, self.name, self.tokenizer, self.template = server, name, tokenizer, template
        self.config, self.defaults = config, defaults
        self.max_model_len = min(config.max_model_len or context_length, context_length)
        self._running: dict[threading.Thread, threading.Event] = {}  # request threads -> their cancel switch
        self._init_bookkeeping()

    @classmethod
    def load(cls, model: ModelConfig, config: EngineConfig) -> "LlamaCppEngine":
        path = check_options(model)
        try:
            import xllamacpp
        except ImportError:
            raise ModelLoadError(f"--backend llamacpp needs the xllamacpp package: {INSTALL}") from None
        tokenizer, meta = load_gguf_tokenizer(path)
        name = model.served_name
        try:
            template = resolve_template(model.conv_template, tokenizer, model_name=f"{name} {path}",
                                        model_type=meta["architecture"])
        except TemplateError as e:
            raise ModelLoadError(str(e)) from None
        max_len = min(config.max_model_len or meta["context_length"], meta["context_length"])
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_parallel = config.max_batch_size
        # one KV pool shared by all slots (each may grow to max_len), sized by a budget, not slots x context
        kv_bytes = parse_size(config.kv_cache_memory) if config.kv_cache_memory else DEFAULT_KV_BYTES
        budget = max(max_len, kv_bytes // meta["kv_bytes_per_token"])
        p.kv_unified = True
        p.n_ctx = min(max_len * config.max_batch_size, budget)
        p.ctx_shift = False  # never drop context silently: our prepare() already bounds prompt + completion
        if model.threads:
            p.cpuparams.n_threads = p.cpuparams_batch.n_threads = model.threads
        p.verbosity = 1 if log.isEnabledFor(logging.DEBUG) else -1
        p.api_keys = [secrets.token_hex(16)]  # its own HTTP listener on 127.0.0.1 stays closed to others
        try:
            server = xllamacpp.Server(p)
        except RuntimeError as e:
            raise ModelLoadError(f"llama.cpp could not load {path}: {e}") from None
        log.info("llama.cpp: %s, %d slots, %d KV cells shared, context %d", path.name, p.n_parallel, p.n_ctx, max_len)
        # A GGUF holds no generation_config; the default model's sampling is the one its import ships.
        shipped = None
        if not model.model_path:
            from ...weights.gguf import DEFAULT_SAMPLING

            shipped = DEFAULT_SAMPLING
        engine = cls(server, name=name, tokenizer=tokenizer, template=template, context_length=max_len,
                     config=config, defaults=model_defaults(str(path), tokenizer, template, generation_config=shipped))
        engine.kv_cells = p.n_ctx
        return engine

    def start(self) -> "LlamaCppEngine":
        return self

    def stop(self) -> None:
        """Cancel what runs, wait for its threads to leave llama.cpp, then free the server."""
        for thread, cancelled in list(self._running.items()):
            cancelled.set()
            thread.join(timeout=10)
        self.server = None  # the last reference: its destructor ends llama.cpp's loop thread

    def _complete(self, body: dict, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                  cancelled: threading.Event) -> None:
        """Run one request in this (our) thread; chunks go to the event loop as they come."""

        def deliver(item) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody listens any more
                return True
            return cancelled.is_set()

        try:
            self.server.handle_completions(body, deliver)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            deliver(ServeError(f"llama.cpp failed: {type(e).__name__}: {e}", status=500))
        finally:
            self._running.pop(threading.current_thread(), None)
        deliver(_END)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        ids, p = self.prepare(request)
        body = (completion_body(ids, p, self.config.prefix_caching)
                | structured.llamacpp_fields(request.constraint))  # structured outputs
        if self.server is None:
            raise ServeError("the engine is not running", status=503, code="model_unavailable", retry_after=5)
        with self.admitted(len(ids)) as track:
            loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
            thread = threading.Thread(target=self._complete, args=(body, loop, queue, cancelled),
                                      daemon=True, name=f"llamacpp-{self.name}")
            self._running[thread] = cancelled
            thread.start()
            strip, produced = LeadingStrip(p.strip_leading), 0
            try:
                while True:
                    items = [await queue.get()]
                    while not queue.empty():  # the consumer lags: send what piled up as one delta
                        items.append(queue.get_nowait())
                    text, reason, logprobs = "", None, None
                    for item in items:
                        if item is _END:
                            raise ServeError("llama.cpp ended the stream without a finish reason", status=500)
                        if isinstance(item, BaseException):
                            raise item
                        piece, reason, lps, final_count = parse_chunk(item, p.logprobs)
                        n = len(lps) if lps is not None else int(bool(piece))
                        if final_count is not None:  # the last chunk's usage is exact
                            n = max(0, final_count - produced)
                        produced += n
                        track.tokens(n)
                        text += strip(piece)
                        if lps:
                            logprobs = (logprobs or []) + lps
                        if reason:
                            break
                    track.finished = reason is not None  # before the yield: the consumer may stop there
                    if text or reason or logprobs:
                        yield Delta(text, reason, len(ids), produced, logprobs)
                    if reason:
                        return
            finally:
                cancelled.set()
