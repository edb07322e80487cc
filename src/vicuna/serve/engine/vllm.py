"""vLLM backend (CUDA only, optional extra ``.[gpu]``) behind the engine interface.

Prompts are rendered by our conversation templates and validated by
:meth:`EngineBase.prepare` (same 400s, same stop ids), then handed to vLLM as token ids;
vLLM does paged attention, its own continuous batching and tensor parallelism
(``--num-gpus``). Every serving option is either mapped or refused with a clear error —
none is silently ignored:

- ``--num-gpus N`` -> ``tensor_parallel_size=N``; ``--dtype`` -> ``dtype``;
- ``--max-gpu-memory SIZE`` -> ``gpu_memory_utilization`` = SIZE / the GPU's memory;
- ``--load-8bit`` -> vLLM's online FP8 weight quantization (``quantization="fp8"``; Ada/Hopper);
- ``--no-prefix-caching`` -> ``enable_prefix_caching=False`` (on by default, as in vLLM);
- ``--lora DIR`` / ``--lora NAME=DIR`` (repeatable) -> ``enable_lora``, ``max_loras`` = the number of adapters,
  ``max_lora_rank`` = the largest rank, and a ``LoRARequest`` per request (each NAME its own model; runtime
  ``/v1/load_lora_adapter`` adds one with a new id);
- ``--device cpu`` / ``--threads`` -> refused (vLLM serves on CUDA here; use hf or llamacpp).

The mapping functions import nothing from vLLM, so they are tested on CPU with fakes of
vLLM's output shapes; the engine itself runs in the GPU pack (`scripts/gpu_check.sh`).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from ...conversation import TemplateError, resolve_template
from ...errors import ModelLoadError, ServeError, UsageError
from ...generation import ModelDefaults, SamplingParams
from ...model import context_length_of, model_defaults
from ...sizes import parse_size
from .. import structured
from ..core import Delta, GenerateRequest
from .base import EngineConfig, ModelConfig
from .external import ExternalEngine, LeadingStrip

log = logging.getLogger(__name__)

INSTALL = "--backend vllm needs vLLM on a CUDA machine: pip install -e '.[gpu]'"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank(adapter: str | Path) -> int:
    """The smallest max_lora_rank vLLM accepts that holds the adapter's rank ``r``."""
    cfg_path = Path(adapter) / "adapter_config.json"
    try:
        r = int(json.loads(cfg_path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(f"--lora {adapter}: no readable adapter_config.json with a rank 'r'; pass a PEFT "
                             "adapter directory") from None
    for rank in LORA_RANKS:
        if r <= rank:
            return rank
    raise ModelLoadError(f"--lora {adapter}: rank {r} is above vLLM's largest ({LORA_RANKS[-1]}); merge it "
                         "first with `vicuna weights merge-lora`")


def engine_args(model: ModelConfig, config: EngineConfig, gpu_memory_bytes: int | None = None) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` keywords for our model and engine settings (refusing what vLLM cannot do)."""
    if model.device not in ("auto", "cuda"):
        raise UsageError(f"--backend vllm serves on CUDA GPUs; --device {model.device}: use --backend hf "
                         "(or llamacpp for GGUF files)")
    if model.threads is not None:
        raise UsageError("--threads is for --backend llamacpp; vLLM runs on the GPU")
    path = str(model.model_path)
    args: dict[str, Any] = {
        "model": path, "tokenizer": path, "tensor_parallel_size": model.num_gpus, "dtype": model.dtype,
        "max_model_len": config.max_model_len, "max_num_seqs": config.max_batch_size,
        "trust_remote_code": model.trust_remote_code, "enable_prefix_caching": config.prefix_caching,
    }
    if model.max_gpu_memory:
        if not gpu_memory_bytes:
            raise UsageError("--max-gpu-memory with --backend vllm needs a visible CUDA GPU")
        share = parse_size(model.max_gpu_memory) / gpu_memory_bytes
        if not 0 < share <= 1:
            raise UsageError(f"--max-gpu-memory {model.max_gpu_memory} is more than the GPU's "
                             f"{gpu_memory_bytes / 2**30:.1f} GiB")
        args["gpu_memory_utilization"] = round(share, 4)
    if model.load_8bit:
        args["quantization"] = "fp8"  # online FP8 weights: the 8-bit mode vLLM has for an unquantized checkpoint
    if model.lora:
        paths = [model.applied_lora, *model.lora_adapters.values()]
        paths = [p for p in paths if p]
        args.update(enable_lora=True, max_loras=len(paths), max_lora_rank=max(map(lora_rank, paths)))
    return args


def lora_requests(model: ModelConfig, lora_request_cls) -> tuple[Any, dict[str, Any]]:
    """(the bare --lora PATH's request or None, {NAME: request}) — one ``LoRARequest(name, int_id, path)`` per
    adapter, ids from 1 (vLLM caches loaded adapters by id, up to ``max_loras`` on the GPU at once)."""
    applied = lora_request_cls(Path(model.applied_lora).name, 1, str(model.applied_lora)) if model.applied_lora \
        else None
    named = {name: lora_request_cls(name, i, str(path))
             for i, (name, path) in enumerate(model.lora_adapters.items(), start=2)}
    return applied, named


def structured_params(c: dict | None):
    """vLLM's structured-output parameters object for our constraint (None without one)."""
    if c is None:
        return None
    try:
        from vllm.sampling_params import StructuredOutputsParams as Params  # vLLM >= 0.11
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams as Params
    return Params(**structured.vllm_fields(c))


def sampling_kwargs(p: SamplingParams, structured_outputs: Any = None) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords for our validated settings (plus its structured-output object)."""
    extra: dict[str, Any] = {}
    if structured_outputs is not None:
        name = type(structured_outputs).__name__
        extra["guided_decoding" if name == "GuidedDecodingParams" else "structured_outputs"] = structured_outputs
    return extra | {
        "n": 1, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or -1,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty, "max_tokens": p.max_new_tokens, "seed": p.seed,
        "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids), "ignore_eos": p.ignore_eos,
        "logprobs": p.logprobs, "skip_special_tokens": True,
    }


def logprob_entries(token_ids, logprobs, start: int, k: int) -> list[dict]:
    """Our logprob entries for tokens ``start:`` of a vLLM completion output.

    vLLM gives, per generated token, ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding
    the top ``k`` and the sampled token; ours is ``{"token", "logprob", "top": [(text, logprob)]}``.
    """
    out = []
    for tid, options in zip(token_ids[start:], (logprobs or [])[start:]):
        chosen = options[tid]
        ranked = sorted(options.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        out.append({"token": chosen.decoded_token or "", "logprob": float(chosen.logprob),
                    "top": [(lp.decoded_token or "", float(lp.logprob)) for lp in ranked[:k]]})
    return out


class VLLMEngine(ExternalEngine):
    backend = "vllm"

    def __init__(self, engine, *, name: str, tokenizer, template, context_length: int, config: EngineConfig,
                 defaults: ModelDefaults, lora_request=None, adapters: dict[str, Any] | None = None):
        self.engine, self.name, self.tokenizer, self.template = engine, name, tokenizer, template
        self.config, self.defaults = config, defaults
        self.max_model_len = min(config.max_model_len or context_length, context_length)
        self.lora_request = lora_request
        self.adapters: dict[str, Any] = dict(adapters or {})  # served name -> LoRARequest
        self._init_bookkeeping()

    def adapter_views(self) -> dict[str, Any]:
        from .base import AdapterView

        return {name: AdapterView(self, name, r.lora_path) for name, r in self.adapters.items()}

    async def load_adapter(self, name: str, path: str):
        """A new LoRARequest: vLLM loads the adapter on its first request (into one of ``max_loras`` slots)."""
        from vllm.lora.request import LoRARequest

        from ...errors import InvalidRequest
        from .base import AdapterView

        if name in self.adapters or name == self.name:
            raise InvalidRequest(f"a model named {name!r} is already served", param="lora_name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise InvalidRequest(f"{path}: no adapter_config.json there; pass a PEFT adapter directory",
                                 param="lora_path")
        ids = [r.lora_int_id for r in self.adapters.values()] + [getattr(self.lora_request, "lora_int_id", 0)]
        self.adapters[name] = LoRARequest(name, max(ids) + 1, str(path))
        return AdapterView(self, name, path)

    def unload_adapter(self, name: str) -> None:
        from ...errors import ModelNotFound

        if self.adapters.pop(name, None) is None:
            raise ModelNotFound.for_model(name, list(self.adapters))

    @classmethod
    def load(cls, model: ModelConfig, config: EngineConfig) -> "VLLMEngine":
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError:
            raise ModelLoadError(INSTALL) from None
        import torch
        from transformers import AutoConfig, AutoTokenizer

        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        kwargs = engine_args(model, config, gpu)
        path, name = str(model.model_path), model.served_name
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
        try:
            template = resolve_template(model.conv_template, tokenizer, model_name=f"{name} {path}",
                                        model_type=hf_config.model_type)
        except TemplateError as e:
            raise ModelLoadError(str(e)) from None
        lora_request, adapters = None, {}
        if model.lora:
            from vllm.lora.request import LoRARequest

            lora_request, adapters = lora_requests(model, LoRARequest)
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
        return cls(engine, name=name, tokenizer=tokenizer, template=template,
                   context_length=config.max_model_len or context_length_of(hf_config), config=config,
                   defaults=model_defaults(path, tokenizer, template), lora_request=lora_request,
                   adapters=adapters)

    def start(self) -> "VLLMEngine":
        return self

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    async def generate(self, request: GenerateRequest, adapter: str | None = None) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VSampling

        from ...errors import ModelNotFound

        lora = self.lora_request
        if adapter is not None:
            if adapter not in self.adapters:
                raise ModelNotFound.for_model(adapter, [self.name, *self.adapters])
            lora = self.adapters[adapter]
        ids, p = self.prepare(request)
        with self.admitted(len(ids)) as track:
            rid, read = uuid.uuid4().hex, OutputReader(p.strip_leading, p.logprobs, len(ids))
            stream = self.engine.generate({"prompt_token_ids": ids}, VSampling(**sampling_kwargs(
                p, structured_params(request.constraint))), rid, lora_request=lora)
            try:
                async for out in stream:
                    before = read.tokens
                    delta = read(out)
                    track.tokens(read.tokens - before)
                    track.finished = delta.finish_reason is not None  # before the yield: the consumer may stop there
                    if delta.text or delta.finish_reason or delta.logprobs:
                        yield delta
                    if track.finished:
                        return
                raise ServeError("vLLM ended the stream without a finish reason", status=500)
            finally:
                if not track.finished:
                    await self.engine.abort(rid)


class OutputReader:
    """Turns vLLM's cumulative ``RequestOutput`` objects into our deltas: new text (chat answers'
    leading whitespace dropped), new logprob entries, the finish reason and token counts."""

    def __init__(self, strip_leading: bool, logprobs: int | None, prompt_tokens: int):
        self.strip, self.k, self.prompt_tokens = LeadingStrip(strip_leading), logprobs, prompt_tokens
        self.chars = self.tokens = 0

    def __call__(self, out) -> Delta:
        o = out.outputs[0]
        text, self.chars = o.text[self.chars:], len(o.text)
        lps = logprob_entries(o.token_ids, o.logprobs, self.tokens, self.k) if self.k is not None else None
        self.tokens = len(o.token_ids)
        reason = (o.finish_reason or "stop") if out.finished else None
        return Delta(self.strip(text), reason, self.prompt_tokens, self.tokens, lps or None)
