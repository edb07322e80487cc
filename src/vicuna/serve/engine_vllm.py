"""vLLM backend (CUDA only, optional extra ``.[gpu]``) behind the engine interface.

Prompts are still rendered by our conversation templates and validated by
:meth:`EngineBase.prepare` (same 400s, same stop ids), then handed to vLLM as
token ids; vLLM does paged attention, its own continuous batching and tensor
parallelism (``--num-gpus``). UNTESTED here: the development machine has no
GPU and vLLM cannot be installed on it; the adapter follows vLLM's documented
``AsyncLLMEngine`` API (``generate(prompt, sampling_params, request_id)``,
``abort(request_id)``).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator

from ..conversation import TemplateError, resolve_template
from ..model import ModelLoadError, context_length_of, model_defaults
from .core import Delta, GenerateRequest, InvalidRequest, Overloaded
from .engine import EngineBase, EngineConfig, EngineStats

log = logging.getLogger(__name__)


class VLLMEngine(EngineBase):
    backend = "vllm"

    def __init__(self, engine, *, name: str, path: str, tokenizer, template, context_length: int,
                 config: EngineConfig):
        self.engine, self.name, self.tokenizer, self.template = engine, name, tokenizer, template
        self.config = config
        self.max_model_len = min(config.max_model_len or context_length, context_length)
        self.defaults = model_defaults(path, tokenizer, template)
        self._inflight = 0
        self._stats = EngineStats()

    @classmethod
    def from_args(cls, args, config: EngineConfig) -> "VLLMEngine":
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError:
            raise ModelLoadError("--backend vllm needs vLLM on a CUDA machine: pip install -e '.[gpu]'") from None
        from transformers import AutoConfig, AutoTokenizer

        path = args.model_path
        name = args.model_name or str(path).rstrip("/").split("/")[-1]
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        try:
            template = resolve_template(args.conv_template, tokenizer, model_name=f"{name} {path}",
                                        model_type=hf_config.model_type)
        except TemplateError as e:
            raise ModelLoadError(str(e)) from None
        engine_args = AsyncEngineArgs(
            model=str(path), tokenizer=str(path), tensor_parallel_size=args.num_gpus,
            dtype="auto" if args.dtype == "auto" else args.dtype, max_model_len=config.max_model_len,
            max_num_seqs=config.max_batch_size, trust_remote_code=args.trust_remote_code,
        )
        engine = AsyncLLMEngine.from_engine_args(engine_args)
        return cls(engine, name=name, path=str(path), tokenizer=tokenizer, template=template,
                   context_length=config.max_model_len or context_length_of(hf_config), config=config)

    def start(self) -> "VLLMEngine":
        return self

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VSampling

        ids, p = self.prepare(request)
        if self._inflight >= self.config.max_batch_size + self.config.max_queue:
            raise Overloaded(f"the server is overloaded ({self._inflight} requests in flight); retry shortly",
                             retry_after=2)
        sp = VSampling(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, max_tokens=p.max_new_tokens, seed=p.seed, stop=list(p.stop),
            stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, logprobs=p.logprobs,
        )
        rid, sent, finished, first, started = uuid.uuid4().hex, 0, False, True, time.perf_counter()
        self._inflight += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, sp, rid):
                o = out.outputs[0]
                text, sent = o.text[sent:], len(o.text)
                finished = out.finished
                if text and first:
                    first = False
                    self._stats.ttft_count += 1
                    self._stats.ttft_sum += time.perf_counter() - started
                if text or finished:
                    yield Delta(text, (o.finish_reason or "stop") if finished else None, len(ids), len(o.token_ids))
            self._stats.requests_finished += 1
            self._stats.generated_tokens += len(o.token_ids)
        finally:
            self._inflight -= 1
            if not finished:
                self._stats.requests_aborted += 1
                await self.engine.abort(rid)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise InvalidRequest("embeddings are served by the hf backend only; run a `--backend hf` worker for them",
                             param="model")

    @property
    def queue_length(self) -> int:
        return self._inflight

    def stats(self) -> EngineStats:
        s = EngineStats(**vars(self._stats))
        s.running = min(self._inflight, self.config.max_batch_size)
        s.waiting = self._inflight - s.running
        return s

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "backend": self.backend, "context_length": self.max_model_len,
                "conv_template": getattr(self.template, "name", "jinja"), "max_batch_size": self.config.max_batch_size}
