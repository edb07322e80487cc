"""The training loop: a plain PyTorch loop over a transformers model.

Why not ``transformers.Trainer``: what this recipe needs most is exactly what
is awkward to bend it into — per-sample-shifted targets for padding-free
packing, loss normalised by the label tokens of the whole optimizer step
across micro-batches *and* ranks, FSDP2 that also runs on CPU/gloo (so it is
tested here), sharded checkpoints every rank writes in parallel, and a SIGTERM
save that all ranks agree on.  Each is a few lines in a loop you can read top
to bottom; the model, optimizer schedule, PEFT and FSDP are still the
well-kept library pieces.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ..conversation import IGNORE_INDEX, TemplateError, get_template, resolve_template, stop_token_ids
from ..errors import TrainError, TrainInputError, VicunaError
from ..files import write_figure, write_json, write_text
from .checkpoint import (CHECKPOINT_RE, CheckpointLoadError, Checkpointer, checkpoint_dirs, complete_checkpoints,
                         full_tensors, load_pretrained_shards, model_tensors, problem, sharded_load_problem)
from .config import TrainConfig, parse_rope_scaling
from .dataset import (DataStats, collate, collate_pairs, load_conversations, load_pairs, pack_best_fit, plan_epoch,
                      tokenize_dataset, tokenize_pairs)
from .distributed import Dist, all_reduce, barrier, broadcast_object, gather_objects, init_distributed
from .memory import GB, MemoryPlan, PeakMeter, estimate, limit_heap_fragmentation

log = logging.getLogger("vicuna.train")

LOG_FILE, PLOT_FILE, MODEL_META = "train_log.jsonl", "loss.png", "vicuna.json"


class Preempted(TrainError):
    """SIGTERM arrived; a checkpoint was saved. Rerunning the command resumes."""

    exit_code = 143


def on_main(fn: Callable[[], Any], d: Dist) -> Any:
    """Run ``fn`` on rank 0 only; its result, or its error, on every rank (so all ranks fail together)."""
    result = None
    if d.main:
        try:
            result = (fn(), None)
        except VicunaError as e:
            result = (None, e)
    result = broadcast_object(result, d)
    if result[1] is not None:
        raise result[1]
    return result[0]


# ----------------------------------------------------------------------------- output dir


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def check_output_dir(cfg: TrainConfig) -> list[Path]:
    """Refuse to clobber a finished model; return the checkpoints to try resuming from, newest first.

    A checkpoint newer than the newest complete one (a save or upload cut short) is skipped with a warning that
    says what is wrong with it.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainInputError(f"--output-dir {out}: exists and is not a directory")
    if (out / MODEL_META).exists() and not cfg.force:
        raise TrainInputError(
            f"--output-dir {out} already holds a trained model; pass --force to train into it again, "
            "or choose another directory"
        )
    if cfg.resume == "never":
        found = checkpoint_dirs(out)
        if found and not cfg.force:
            raise TrainInputError(
                f"--output-dir {out} has checkpoints ({found[-1][1].name}); use --resume auto to continue, "
                "or --resume never --force to start over (deletes them)"
            )
        return []
    if cfg.resume == "auto":
        good, bad = complete_checkpoints(out)
        for path, why in bad:
            if not good or _step_of(path) > _step_of(good[0]):
                where = f"resuming from {good[0].name} instead" if good else "starting from the base model"
                log.warning("%s is incomplete: %s; %s", path.name, why, where)
        return good
    path = Path(cfg.resume)
    why = problem(path) if path.is_dir() else "no such folder"
    if why:
        raise TrainInputError(f"--resume {path}: not a complete checkpoint: {why}")
    return [path]


def resume(ckpt: Checkpointer, candidates: list[Path], cfg: TrainConfig, d: Dist) -> dict | None:
    """Load the newest loadable checkpoint; a corrupt one falls back to the previous, with a warning."""
    for i, path in enumerate(candidates):
        try:
            return {**ckpt.load(path), "path": path}
        except CheckpointLoadError as e:
            if cfg.resume not in ("auto", "never"):
                raise TrainInputError(f"--resume {path}: cannot load it: {e}") from None
            if d.main:
                nxt = f"trying {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older one left"
                log.warning("%s cannot be loaded: %s; %s", path.name, e, nxt)
    if candidates:
        raise TrainError(f"no checkpoint in {cfg.output_dir} could be loaded (see the warnings above); to start "
                         "over, rerun with --resume never --force (deletes them)")
    return None


# ----------------------------------------------------------------------------- model


def load_tokenizer(cfg: TrainConfig, convs) -> Any:
    init = cfg.model_init or {}
    if init.get("from_tokenizer"):
        path = init["from_tokenizer"]
    elif init.get("train_tokenizer"):
        from ..tiny import train_bpe_tokenizer, train_sentencepiece_tokenizer

        spec = dict(init["train_tokenizer"])
        kind, vocab = spec.get("kind", "bpe"), int(spec.get("vocab_size", 1024))
        if not cfg.conv_template:
            raise TrainInputError("model_init.train_tokenizer needs conv_template (a fresh tokenizer has no chat template)")
        # train on rendered text, so the template's own words (system prompt, roles) get merges too
        template = get_template(cfg.conv_template)
        texts = []
        for c in convs:
            try:
                texts.append(template.render_for_training(c, bos_token="<s>", eos_token="</s>")[0])
            except TemplateError:
                pass
        if kind == "bpe":
            return train_bpe_tokenizer(texts, vocab_size=vocab)
        if kind == "sentencepiece":
            return train_sentencepiece_tokenizer(texts, vocab_size=vocab)
        raise TrainInputError(f"model_init.train_tokenizer.kind {kind!r}: use bpe or sentencepiece")
    elif cfg.model_init:
        raise TrainInputError("model_init needs from_tokenizer: DIR or train_tokenizer: {kind, vocab_size}")
    else:
        path = cfg.model_path
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TrainInputError(f"cannot load a tokenizer from {path}: {e}") from None


def model_position_limit(cfg: TrainConfig) -> tuple[Any, int | None]:
    """The base model's config (cheap: no weights) and its position limit."""
    if cfg.model_init:
        return None, int(cfg.model_init.get("max_position_embeddings", 512))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model_path)
    except (OSError, ValueError) as e:
        raise TrainInputError(f"--model-path {cfg.model_path}: not a loadable model ({e})") from None
    return config, getattr(config, "max_position_embeddings", None)


def apply_rope_scaling(config, cfg: TrainConfig, limit: int | None) -> None:
    if limit is None or cfg.max_length <= limit:
        return
    if config is None:  # model_init: a fresh model, sized by the recipe
        raise TrainInputError(f"--max-length {cfg.max_length} is beyond model_init.max_position_embeddings ({limit}); "
                              "raise it in the recipe")
    if not cfg.rope_scaling:
        raise TrainInputError(
            f"--max-length {cfg.max_length} is beyond the model's {limit} positions; lower it, or extend the "
            f"context with RoPE scaling, e.g. --rope-scaling linear:{math.ceil(cfg.max_length / limit)}"
        )
    kind, factor = parse_rope_scaling(cfg.rope_scaling)
    factor = factor or math.ceil(cfg.max_length / limit)
    if factor * limit < cfg.max_length:
        raise TrainInputError(f"--rope-scaling {cfg.rope_scaling}: {limit} x {factor} positions < --max-length")
    if config is not None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update(rope_type=kind, factor=float(factor))
        if kind == "yarn":
            params.setdefault("original_max_position_embeddings", limit)
        config.rope_parameters = params
        config.max_position_embeddings = int(limit * factor)


def pick_attention(cfg: TrainConfig, device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def pick_dtype(cfg: TrainConfig, device):
    import torch

    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def sharded_loading(cfg: TrainConfig, d: Dist) -> bool:
    """Whether this run builds the model on the meta device and loads each rank's shard directly."""
    return d.on and cfg.fsdp != "none" and not cfg.lora and not cfg.model_init


def meta_model(config, attn: str):
    """The model with its parameters on the meta device (no memory); buffers such as RoPE tables are real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.tie_weights()  # under the meta patch each module got its own parameter object: tie them again
    return model


def build_model(cfg: TrainConfig, config, tokenizer, d: Dist) -> tuple[Any, bool]:
    """fp32 master weights (or 4-bit base for QLoRA); mixed precision is applied in the loop.

    Returns (model, on_meta): under FSDP the parameters stay on the meta device until :func:`materialize` has
    sharded them, so no rank ever holds the whole model.
    """
    import torch

    attn = pick_attention(cfg, d.device)
    model = None
    if cfg.model_init:
        from ..tiny import make_tiny_llama

        keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
        unknown = set(cfg.model_init) - set(keys) - {"from_tokenizer", "train_tokenizer"}
        if unknown:
            raise TrainInputError(f"model_init: unknown keys {sorted(unknown)}; known: {', '.join(keys)}")
        model = make_tiny_llama(tokenizer, seed=cfg.seed, **{k: int(v) for k, v in cfg.model_init.items() if k in keys})
        model.config._attn_implementation = attn
    elif sharded_loading(cfg, d):
        model = meta_model(config, attn)
        why = ("the tokenizer has more tokens than the model has embedding rows"
               if len(tokenizer) > model.get_input_embeddings().weight.shape[0]
               else sharded_load_problem(Path(cfg.model_path), list(model_tensors(model))))
        if why:
            if d.main:
                log.warning("loading the whole model on every rank, then sharding it (more memory): %s", why)
            model = None
    on_meta = model is not None and not cfg.model_init
    if model is None:
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {"config": config, "attn_implementation": attn, "dtype": torch.float32}
        if cfg.qlora:
            if d.device.type != "cuda":
                raise TrainInputError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); use --lora on CPU")
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=pick_dtype(cfg, d.device) or torch.float32,
            )
            kw["device_map"] = {"": d.device}
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_path, **kw)
        except Exception as e:  # corrupt weights raise library-specific errors; all mean the same here
            raise TrainError(f"cannot load the model from {cfg.model_path}: {type(e).__name__}: {e}") from e
    model.config.use_cache = False
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = add_lora(model, cfg)
    if not cfg.qlora and not on_meta:
        model.to(d.device)
    return model, on_meta


def add_lora(model, cfg: TrainConfig, prepare_kbit: bool = True):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.qlora and prepare_kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    try:
        return get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target,
            task_type="CAUSAL_LM",
        ))
    except ValueError as e:
        raise TrainInputError(f"--lora-target {cfg.lora_target}: {e}") from None


def tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def wrap_distributed(model, cfg: TrainConfig, d: Dist, dtype):
    """FSDP2 or DDP under torchrun.

    FSDP units: each decoder layer; untied embeddings and ``lm_head`` each on their own; the root holds the rest
    (and a tied embedding, which both ends of the model use). A unit's parameters are gathered only while it runs,
    except the root's, which stay gathered for the step: keeping it small matters.
    """
    if not d.on:
        return model
    import torch

    if cfg.fsdp == "none":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if dtype == torch.float16:
        raise TrainInputError("--precision fp16 is not supported with FSDP; use bf16")
    mesh = init_device_mesh(d.device.type, (d.world,))
    kw: dict[str, Any] = {"mesh": mesh}
    if dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for m in fsdp_units(model, cfg):
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_units(model, cfg: TrainConfig) -> list:
    """The modules sharded as their own FSDP units; the root unit holds the rest."""
    units = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not tied_embeddings(model) and not cfg.lora:
        units += [model.get_input_embeddings(), model.get_output_embeddings()]
    return units


def materialize(model, cfg: TrainConfig, d: Dist) -> None:
    """Give a sharded meta model its memory (each rank its shard) and read each rank's rows from the base files."""
    buffers = dict(model.named_buffers())  # computed at construction; to_empty would leave them uninitialised
    model.to_empty(device=d.device)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf.to(d.device)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load_pretrained_shards(model, Path(cfg.model_path), d)
    except (Exception, CheckpointException) as e:  # DCP wraps every rank's failure (a BaseException)
        raise TrainError(f"cannot load the model from {cfg.model_path}: {type(e).__name__}: {e}") from e
    if getattr(model.config, "tie_word_embeddings", False) and not tied_embeddings(model):
        raise TrainError("internal error: the tied embeddings came apart while sharding the model")


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(model, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding params + attention (PaLM appendix B).

    ``seq_len`` is the mean *sample* length: packed samples do not attend to each other.
    """
    cfg = unwrap(model).config
    params = sum(p.numel() for n, p in unwrap(model).named_parameters() if "embed" not in n)
    if hasattr(model, "peft_config"):  # frozen weights still cost forward + input-grad backward
        params = params * 4 / 6 + sum(p.numel() for p in model.parameters() if p.requires_grad) * 2 / 6
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    return 6 * params + 12 * layers * hidden * seq_len


# bf16 dense peak TFLOP/s of common training GPUs (vendor data sheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "4090": 165.0, "3090": 71.0, "V100": 125.0, "A6000": 155.0}


def peak_flops(cfg: TrainConfig, device) -> float:
    import torch

    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
        return 100e12
    # rough CPU figure: threads x 2.5 GHz x fp32 FLOP/cycle of two FMA units (AVX-512: 64, AVX2: 32)
    try:
        avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        avx512 = False
    return torch.get_num_threads() * 2.5e9 * (64 if avx512 else 32)


# ----------------------------------------------------------------------------- model folders


def write_model_files(folder: Path, model, tokenizer, template, cfg: TrainConfig, meta: dict) -> None:
    """Everything of a Hugging Face model folder but the weights: config (or adapter config), tokenizer with the chat
    template embedded, generation config with the template's stop ids, and ``vicuna.json`` (last)."""
    import torch

    from ..weights.checkpoint import set_config_dtype

    inner = unwrap(model)
    base = inner.get_base_model() if cfg.lora else inner
    if cfg.lora:
        inner.peft_config["default"].save_pretrained(folder)
    else:
        config = copy.deepcopy(base.config)
        config.use_cache = True  # off for training only
        config.architectures = [type(base).__name__]
        config.save_pretrained(folder)
        set_config_dtype(folder, torch.float32)  # the master weights are saved
    tokenizer.chat_template = template.to_jinja()
    # in tokenizer_config.json itself, where every tool (vLLM, TGI, older transformers) looks
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    stops = stop_token_ids(template, tokenizer)
    gen = copy.deepcopy(base.generation_config)
    gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else gen.eos_token_id)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(folder)
    write_json(folder / MODEL_META, {"conv_template": template.name, "base_model": cfg.model_path, "lora": cfg.lora,
                                     "stop_token_ids": stops, **meta, "config": asdict(cfg)}, default=str)


def base_model_name(model_path: str | None) -> str | None:
    """The base model's name for a model card: a hub id as given; for a local folder, the name its config or
    vicuna.json records (when that is not a path), else the folder's name. Never a local path."""
    if not model_path:
        return None
    p = Path(model_path)
    if not p.exists():
        return model_path  # a hub id
    for meta, key in (("vicuna.json", "base_model"), ("config.json", "_name_or_path")):
        try:
            name = json.loads((p / meta).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name and not Path(name).is_absolute() and not name.startswith(".") \
                and not Path(name).exists():
            return name
    return p.resolve().name


def model_card(out: Path, meta: dict) -> str:
    """README.md in Hugging Face model-card form (YAML front matter, then the facts of this run), from the model's
    vicuna.json; an evaluation report already in OUT (``report.md`` or ``eval/report/report.md``) is included."""
    import yaml

    cfg, d, summary = meta.get("config") or {}, meta.get("data") or {}, meta.get("train") or {}
    lora = bool(cfg.get("lora"))
    base = base_model_name(cfg.get("model_path"))
    objective = cfg.get("objective") or "sft"
    preference = objective != "sft"
    front = {"library_name": "peft" if lora else "transformers", "pipeline_tag": "text-generation",
             "tags": ["vicuna", objective, *(["lora"] if lora else [])]}
    if base:
        front["base_model"] = base
    keys = ["max_length", "packing", "num_epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "precision",
            "lora", *(["lora_r", "lora_alpha", "lora_target"] if lora else [])]
    if preference:
        keys[:0] = ["objective", "beta"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {out.resolve().name}", "",
             f"{'A LoRA adapter for' if lora else 'A fine-tune of'} `{base or 'a model built from model_init'}`, "
             f"trained with `vicuna train` ({objective}); chat template `{meta.get('conv_template')}`.", "",
             "## Data", "", f"| file | records | {d.get('unit', 'conversations')} kept | tokens | trained tokens |",
             "|---|---|---|---|---|",
             f"| {Path(str(cfg.get('data_path'))).name} | {d.get('records')} | {d.get('kept')} | {d.get('tokens')} "
             f"| {d.get('trained_tokens')} |", ""]
    if d.get("skipped") or d.get("truncated") or d.get("dropped_long"):
        lines += [f"Skipped: {d.get('skipped') or 'none'}; truncated {d.get('truncated', 0)}, dropped as too long "
                  f"{d.get('dropped_long', 0)}.", ""]
    setting = (f" (preference tuning, beta {cfg.get('beta')}; reference: the base model"
               f"{' with the adapter disabled' if lora else ', its weights before the first step'})" if preference
               else "")
    lines += ["## Training", "", f"Objective: {objective}{setting}. Steps: {summary.get('steps')} on "
              f"{summary.get('world_size', 1)} process(es).", "", "| setting | value |", "|---|---|",
              *(f"| {k} | {cfg.get(k)} |" for k in keys if k in cfg), "",
              "## Results", "", f"- first loss: {summary.get('first_loss')}",
              f"- final loss: {summary.get('final_loss')}",
              *(f"- final {k.replace('_', ' ')}: {v}" for k, v in (summary.get("final_metrics") or {}).items()),
              f"- log: `{LOG_FILE}`, plot: `{PLOT_FILE}`", ""]
    for report in (out / "report.md", out / "eval" / "report" / "report.md"):
        if report.is_file():
            lines += ["## Evaluation", "", report.read_text(encoding="utf-8").strip(), ""]
            break
    lines += ["## Use", "", "```bash", f"vicuna serve --model-path {'BASE --lora ' if lora else ''}{out.name}",
              "```", ""]
    return "\n".join(lines)


def write_model_card(out: Path) -> Path:
    """(Re)write OUT/README.md from OUT/vicuna.json, e.g. after an evaluation report was added."""
    return write_text(Path(out) / "README.md", model_card(Path(out), json.loads((Path(out) / MODEL_META).read_text())))


def save_model_dir(out: Path, model, tokenizer, template, cfg: TrainConfig, d: Dist, stats: DataStats,
                   summary: dict) -> None:
    """A Hugging Face model (or LoRA adapter) dir with the chat template embedded.

    The weights are gathered one tensor at a time and streamed into safetensors shards by rank 0, so no rank
    holds a full state dict. Written into a temp dir, then moved file by file; ``vicuna.json`` last, so its
    presence means the model is complete.
    """
    from ..weights.checkpoint import DEFAULT_MAX_SHARD, ShardWriter

    tmp = out / ".model.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if cfg.lora:  # an adapter is small: PEFT writes it in its own format
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))
        if d.main:
            unwrap(model).save_pretrained(tmp, state_dict=sd)
    else:
        plan = [(name, tuple(t.shape), t.dtype) for name, t in model_tensors(model).items()]
        writer = ShardWriter(tmp, plan, DEFAULT_MAX_SHARD) if d.main else None
        with writer or contextlib.nullcontext():
            for name, tensor in full_tensors(model, d):
                if writer:
                    writer.add(name, tensor)
            if writer:
                writer.close()
    if d.main:
        write_model_files(tmp, model, tokenizer, template, cfg, {"data": stats.to_dict(), "train": summary})
        write_text(tmp / "README.md", model_card(out, json.loads((tmp / MODEL_META).read_text())))
        # a stale chat_template.jinja (from an earlier run with --force) would override the embedded one
        (out / "chat_template.jinja").unlink(missing_ok=True)
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_META):
            os.replace(p, out / p.name)
        tmp.rmdir()
        log.info("saved the %s to %s (template %s)", "LoRA adapter" if cfg.lora else "model", out, template.name)
    barrier(d)


def plot_loss(out: Path) -> None:
    """OUT/loss.png from the log so far; nothing to plot (no step logged yet, e.g. a save before the first
    --logging-steps boundary) is not an error."""
    path = out / LOG_FILE
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    preference = "margin" in rows[0]
    # a preference run also shows what DPO moves: the reward margin and how many pairs are ranked right
    panels = [("loss (per pair)" if preference else "loss (per trained token)", "loss")]
    if preference:
        panels += [("reward margin (chosen - rejected)", "margin"), ("preference accuracy", "accuracy")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels) + 1.4), sharex=True, squeeze=False)
    for ax, (label, key) in zip(axes[:, 0], panels):
        ax.plot(steps, [r[key] for r in rows], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if preference:
        axes[1, 0].axhline(0, color="grey", lw=0.8)
        axes[2, 0].set_ylim(-0.05, 1.05)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title(out.name)
    fig.tight_layout()
    write_figure(out / PLOT_FILE, fig, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def accumulate_gradients(model, batches, d: Dist, *, fsdp: bool = False, autocast=None, scaler=None,
                         preference: tuple[str, float] | None = None):
    """Forward/backward every micro-batch of one optimizer step on this rank.

    The loss is the sum of per-token losses over the trained tokens of the
    *whole step* (all micro-batches on all ranks), so accumulation and data
    parallelism give the gradient of one big batch.  Returns the summed
    (unnormalised) loss of all ranks and the step's global counts
    ``[target, real, computed]`` tokens.

    With ``preference`` (loss type, beta) the batches are pairs (:func:`collate_pairs`): the loss is summed per
    pair and normalised by the pairs of the whole step (the mean over one big batch), ``counts[0]`` counts pairs,
    and ``counts[3:6]`` are the step's sums of chosen rewards, rejected rewards and pairs ranked right.
    """
    import torch

    units = sum(b["pairs"] if preference else b["target_tokens"] for b in batches)
    counts = torch.tensor([units, sum(b["real_tokens"] for b in batches),
                           sum(b["computed_tokens"] for b in batches)], dtype=torch.float64, device=d.device)
    counts = all_reduce(counts, d)
    scale = d.world / max(counts[0].item(), 1.0)  # DDP/FSDP average ranks' gradients, hence x world
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    metric_sums = torch.zeros(3, dtype=torch.float64, device=d.device)
    for i, b in enumerate(batches):
        # DDP skips the all-reduce until the last micro-batch. FSDP reduce-scatters after every one: skipping it
        # would keep every layer's *unsharded* gradients until the step ends, the whole model's worth per rank.
        sync = model.no_sync() if d.on and not fsdp and i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            if preference:
                ce, sums = _preference_loss(model, b, d, autocast, *preference)
                metric_sums += sums
            else:
                ce = _loss(model, b, d, autocast)
            scaled = ce * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += ce.detach().double()
    if preference:
        counts = torch.cat([counts, all_reduce(metric_sums, d)])
    return all_reduce(loss_sum, d), counts


def _logits(model, b: dict, d: Dist, autocast):
    with autocast or contextlib.nullcontext():
        kw = {"input_ids": b["input_ids"].to(d.device), "position_ids": b["position_ids"].to(d.device)}
        if "attention_mask" in b:
            kw["attention_mask"] = b["attention_mask"].to(d.device)
        return model(**kw, use_cache=False).logits


def _loss(model, b: dict, d: Dist, autocast):
    """Summed cross-entropy of one micro-batch; the logits are not kept alive into backward (vocab x tokens)."""
    import torch.nn.functional as F

    logits = _logits(model, b, d, autocast)
    return F.cross_entropy(logits.float().flatten(0, 1), b["targets"].to(d.device).flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_logps(model, b: dict, d: Dist, autocast):
    """Summed answer log-probs of every sequence of a :func:`collate_pairs` batch (chosen 2k, rejected 2k+1)."""
    import torch
    import torch.nn.functional as F

    logits = _logits(model, b, d, autocast)
    per_token = -F.cross_entropy(logits.float().flatten(0, 1), b["targets"].to(d.device).flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")
    seg = b["segments"].to(d.device).flatten()
    keep = seg >= 0
    return torch.zeros(2 * b["pairs"], dtype=per_token.dtype, device=d.device).index_add(0, seg[keep], per_token[keep])


def _preference_loss(model, b: dict, d: Dist, autocast, loss_type: str, beta: float):
    """Summed preference loss of one micro-batch of pairs, and its sums of [chosen reward, rejected reward, right]."""
    import torch

    from .preference import preference_loss

    logps = sequence_logps(model, b, d, autocast).double()
    out = preference_loss(logps[0::2], logps[1::2], b["ref_chosen"].to(d.device), b["ref_rejected"].to(d.device),
                          beta=beta, loss_type=loss_type, chosen_tokens=b["chosen_tokens"].to(d.device),
                          rejected_tokens=b["rejected_tokens"].to(d.device))
    sums = torch.stack([out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                        (out.chosen_rewards > out.rejected_rewards).double().sum()])
    return out.loss * b["pairs"], sums


def reference_logps(model, pairs, groups: list[list[int]], cfg: TrainConfig, d: Dist, autocast, pad_id: int) -> None:
    """Fill every pair's reference log-probs, once, before the first step (no grad, batched like training).

    The reference is the model as built, before any checkpoint is loaded: for LoRA the base with the adapter
    disabled (the same weights, no second copy); for full fine-tuning the initial weights. A resumed run
    recomputes them the same way (the checkpoint is loaded after this), so it gets the same values. Every rank
    computes all pairs (FSDP needs every rank in every forward; a rank's batches may hold any pair).
    """
    import torch

    disabled = unwrap(model).disable_adapter() if cfg.lora else contextlib.nullcontext()
    was_training = model.training
    model.eval()  # no dropout in the reference
    try:
        with torch.no_grad(), disabled:
            for i in range(0, len(groups), cfg.per_device_batch_size):
                mb = groups[i:i + cfg.per_device_batch_size]
                logps = sequence_logps(model, collate_pairs(pairs, mb, pad_id, packed=cfg.packing), d,
                                       autocast).double().cpu().tolist()
                for k, j in enumerate(j for row in mb for j in row):
                    pairs[j].ref_chosen, pairs[j].ref_rejected = logps[2 * k], logps[2 * k + 1]
    finally:
        model.train(was_training)


class _Reporter:
    """train_log.jsonl (+ optional tensorboard/wandb) on rank 0."""

    def __init__(self, out: Path, cfg: TrainConfig, start_step: int, main: bool):
        self.main, self.path, self.backend = main, out / LOG_FILE, None
        if not main:
            return
        if self.path.exists():  # drop rows past the resumed step: they will be redone
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln)["step"] <= start_step]
            write_text(self.path, "".join(k + "\n" for k in keep))
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(out / "runs"))
        elif cfg.report_to == "wandb":
            import wandb

            self.backend = wandb.init(project=os.environ.get("WANDB_PROJECT", "vicuna"), config=asdict(cfg),
                                      resume="allow")

    def log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.backend is not None:
            if hasattr(self.backend, "add_scalar"):
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.backend.add_scalar(f"train/{k}", v, row["step"])
                self.backend.flush()
            else:
                self.backend.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.backend is not None:
            (getattr(self.backend, "close", None) or self.backend.finish)()


def _check_report_backend(cfg: TrainConfig) -> None:
    mod = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.report_to)
    if mod:
        try:
            __import__(mod)
        except ImportError:
            raise TrainInputError(f"--report-to {cfg.report_to} needs the {mod} package: pip install {mod}") from None


def row_capacity(cfg: TrainConfig) -> int:
    """Tokens a packed row holds: --max-length, or twice it for pairs (a pair's two sequences share a row)."""
    return 2 * cfg.max_length if cfg.preference else cfg.max_length


def memory_plan(model, cfg: TrainConfig, world: int, device) -> MemoryPlan:
    """The per-rank estimate for ``model`` (real or on the meta device) under ``cfg`` at ``world`` ranks."""
    dtype = pick_dtype(cfg, device)
    inner = unwrap(model)
    sharded = world > 1 and cfg.fsdp != "none"
    return estimate(inner, inner.config, world=world, units=fsdp_units(inner, cfg) if sharded else [],
                    rows=cfg.per_device_batch_size, row_tokens=row_capacity(cfg), compute_bytes=4 if dtype is None else 2,
                    masked=pick_attention(cfg, device) != "flash_attention_2",
                    gradient_checkpointing=cfg.gradient_checkpointing, accumulation=cfg.gradient_accumulation_steps,
                    frozen_bytes=0.56 if cfg.qlora else 4, offload=cfg.fsdp_cpu_offload)


def memory_summary(meter: PeakMeter, planned: MemoryPlan, d: Dist) -> dict:
    """Measured peak per rank next to the estimate (in vicuna.json, and logged)."""
    peaks = gather_objects(meter.peak(), d)
    if d.main and all(p is not None for p in peaks):
        log.info("memory per rank: peak %.2f GB measured (%s), %.2f GB estimated", max(peaks) / GB,
                 "CUDA allocator" if meter.cuda else "RSS growth from just before the model was built",
                 planned.total / GB)
    return {"peak_gb_per_rank": [None if p is None else round(p / GB, 4) for p in peaks],
            "measured": "cuda max_memory_allocated" if meter.cuda else "RSS growth from before the model was built",
            "estimate": planned.to_dict()}


def dry_run(cfg: TrainConfig, world: int | None = None) -> tuple[MemoryPlan, str]:
    """Per-rank memory of ``cfg`` at ``world`` ranks, from the model's shape alone (built on the meta device)."""
    import torch

    if cfg.model_init:
        raise TrainInputError("--dry-run needs --model-path (a model_init recipe sizes its model from the data)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    config, limit = model_position_limit(cfg)
    apply_rope_scaling(config, cfg, limit)
    model = meta_model(config, pick_attention(cfg, device))
    if cfg.lora:
        model = add_lora(model, cfg, prepare_kbit=False)
    plan = memory_plan(model, cfg, world, device)
    dtype = pick_dtype(cfg, device)
    mode = ("FSDP full shard" if plan.sharded else "DDP (every rank holds everything)" if world > 1
            else "one process") + (" + CPU offload" if cfg.fsdp_cpu_offload and plan.sharded else "")
    head = [f"model:  {cfg.model_path}: {plan.parameters / 1e9:.3g}B parameters"
            f" ({plan.trainable / 1e9:.3g}B trained{', LoRA' if cfg.lora else ''}), {config.num_hidden_layers} layers",
            f"run:    {world} rank(s), {mode}, {'fp32' if dtype is None else str(dtype).removeprefix('torch.')}"
            f" compute, {cfg.per_device_batch_size} x {row_capacity(cfg)} tokens per micro-batch"
            f"{' (a pair per row: chosen + rejected)' if cfg.preference else ''}",
            "per rank:"]
    notes = ["not counted: the CUDA context and allocator slack (~1-3 GB per GPU), communication buffers;"
             " on CPU, the interpreter and libraries"]
    return plan, "\n".join([*head, plan.table(), *notes])


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training job; returns the output directory."""
    import torch

    if cfg.qlora and int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.fsdp != "none":
        raise TrainInputError("--qlora does not combine with FSDP here (its 4-bit weights are not sharded); use "
                              "--fsdp none (DDP: each GPU holds the 4-bit base, small by design) or --lora")
    d = init_distributed()
    if d.device.type == "cpu":
        limit_heap_fragmentation()
    try:
        return _train(cfg, d, torch)
    finally:
        if d.on:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, torch) -> Path:
    out = Path(cfg.output_dir)
    candidates = on_main(lambda: check_output_dir(cfg), d)
    _check_report_backend(cfg)
    if not d.main:
        logging.getLogger("vicuna").setLevel(logging.WARNING)
    if not (d.main and sys.stderr.isatty()):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # ---- data, before any weights are loaded: bad input fails in seconds
    stats = DataStats()
    if cfg.preference:
        pairs = load_pairs(cfg.data_path, stats)
        convs = [[*p, {"role": "assistant", "content": a}] for p, c, r in pairs for a in (c, r)]
    else:
        convs = load_conversations(cfg.data_path, stats)
    base_config, limit = model_position_limit(cfg)
    apply_rope_scaling(base_config, cfg, limit)
    tokenizer = load_tokenizer(cfg, convs)
    try:
        template = resolve_template(cfg.conv_template, tokenizer=tokenizer, model_name=str(cfg.model_path or ""))
    except TemplateError as e:
        raise TrainInputError(str(e)) from None
    if cfg.preference:
        samples = tokenize_pairs(pairs, tokenizer, template, cfg.max_length, drop_long=cfg.drop_long, stats=stats,
                                 source=str(cfg.data_path))
        del pairs
    else:
        samples = tokenize_dataset(convs, tokenizer, template, cfg.max_length, drop_long=cfg.drop_long, stats=stats,
                                   source=str(cfg.data_path))
    del convs
    log.info("data: %s; template %s", stats.summary(), template.name)
    rows = pack_best_fit([len(s) for s in samples], row_capacity(cfg)) if cfg.packing else None
    per_step = cfg.gradient_accumulation_steps * d.world
    n_micro = len(plan_epoch(samples, cfg.batching, cfg.per_device_batch_size, 0, cfg.seed, rows))
    steps_per_epoch = n_micro // per_step
    if steps_per_epoch == 0:
        raise TrainInputError(
            f"the data makes {n_micro} micro-batches, fewer than one optimizer step needs "
            f"({cfg.gradient_accumulation_steps} accumulation x {d.world} processes); lower "
            "--gradient-accumulation-steps or --per-device-batch-size"
        )
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    if n_micro % per_step:
        log.info("each epoch leaves out %d of %d micro-batches (a different part each epoch)",
                 n_micro % per_step, n_micro)

    # ---- model
    dtype = pick_dtype(cfg, d.device)
    torch.manual_seed(cfg.seed)
    meter = PeakMeter(d.device)
    meter.start()
    model, on_meta = build_model(cfg, base_config, tokenizer, d)
    planned = memory_plan(model, cfg, d.world, d.device)
    fpt = flops_per_token(model, stats.tokens / max(stats.kept, 1))
    peak = peak_flops(cfg, d.device) * d.world
    model = wrap_distributed(model, cfg, d, dtype)
    if on_meta:
        materialize(model, cfg, d)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    fsdp = d.on and cfg.fsdp != "none"
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype is not None and not fsdp
                else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(d.device.type) if dtype == torch.float16 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    preference = ("sigmoid" if cfg.objective == "dpo" else cfg.objective, cfg.beta) if cfg.preference else None
    if preference:  # before a checkpoint is loaded: the model still holds the reference weights
        t0 = time.perf_counter()
        reference_logps(model, samples, rows if rows is not None else [[i] for i in range(len(samples))], cfg, d,
                        autocast, pad_id)
        log.info("reference log-probs of %d pairs in %.1f s", len(samples), time.perf_counter() - t0)
    ckpt = Checkpointer(out, model, optimizer, scheduler, d, lora=cfg.lora, keep=cfg.save_total_limit,
                        background=cfg.async_save, model_files=lambda folder: write_model_files(
                            folder, model, tokenizer, template, cfg, {"data": stats.to_dict()}))
    state = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "micro_batches_per_step": per_step,
             "seed": cfg.seed, "data": stats.to_dict()}

    start = 0
    resumed = resume(ckpt, candidates, cfg, d)
    if resumed is not None:
        start = int(resumed["step"])
        log.info("resumed from %s (step %d of %d)", resumed["path"], start, total)
        if resumed.get("micro_batches_per_step") != per_step and d.main:
            log.warning("the checkpoint took %s micro-batches per step, this run %d (another world size or "
                        "accumulation): the global batch, and the data order from here on, differ from the "
                        "interrupted run's", resumed.get("micro_batches_per_step"), per_step)
    elif cfg.resume == "never" and d.main:
        for _, p in checkpoint_dirs(out):
            shutil.rmtree(p)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(d)
    reporter = _Reporter(out, cfg, start, d.main)

    stop = {"flag": False}
    prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    model.train()
    plans: dict[int, list] = {}
    progress = None
    if d.main:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)
    window = {"t": time.perf_counter(), "real": 0, "computed": 0}
    loss = float("nan")
    first_loss = None
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(samples, cfg.batching, cfg.per_device_batch_size, epoch, cfg.seed, rows)}
        mine = plans[epoch][k * per_step:(k + 1) * per_step][d.rank * cfg.gradient_accumulation_steps:]
        mine = mine[:cfg.gradient_accumulation_steps]
        batches = [(collate_pairs if preference else collate)(samples, mb, pad_id, packed=cfg.packing) for mb in mine]
        loss_sum, counts = accumulate_gradients(model, batches, d, fsdp=fsdp, autocast=autocast, scaler=scaler,
                                                preference=preference)
        n_tgt = counts[0].item()
        if scaler:
            scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = (loss_sum / max(n_tgt, 1.0)).item()
        first_loss = loss if first_loss is None else first_loss
        if preference:  # the step's means over its pairs
            chosen, rejected, right = (counts[3:6] / max(n_tgt, 1.0)).tolist()
            pref_metrics = {"rewards_chosen": round(chosen, 6), "rewards_rejected": round(rejected, 6),
                            "margin": round(chosen - rejected, 6), "accuracy": round(right, 6)}
        window["real"] += counts[1].item()
        window["computed"] += counts[2].item()
        done = step + 1
        if cfg.throttle:
            time.sleep(cfg.throttle)
        if done % cfg.logging_steps == 0 or done == total:
            el = max(time.perf_counter() - window["t"], 1e-9)
            tps = window["real"] / el
            row = {"step": done, "epoch": round(step / steps_per_epoch + 1e-9, 4), "loss": round(loss, 6),
                   "lr": lr, "grad_norm": round(float(grad_norm), 6), "tokens_per_s": round(tps, 1),
                   "real_token_share": round(window["real"] / max(window["computed"], 1), 4),
                   "mfu": round(window["real"] / el * fpt / peak, 6)}
            if preference:
                row.update(pref_metrics)
            reporter.log(row)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if not (progress and not progress.disable):
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", done, total, loss, lr,
                         float(grad_norm), tps)
            window = {"t": time.perf_counter(), "real": 0, "computed": 0}
        if progress is not None:
            progress.update(1)
        # one collective per step: SIGTERM anywhere, and whether a background save is still writing anywhere
        flags = all_reduce(torch.tensor([float(stop["flag"]), float(ckpt.busy())], device=d.device), d, op="max")
        if ckpt.pending is not None and not flags[1].item():
            ckpt.finish()
        preempted = bool(flags[0].item()) and done < total
        if (cfg.save_steps and done % cfg.save_steps == 0 and done < total) or preempted:
            ckpt.save(done, state, background=cfg.async_save and not preempted)
            if d.main:
                plot_loss(out)
        if preempted:
            reporter.close()
            raise Preempted(f"stopped by SIGTERM after step {done}/{total}; checkpoint saved in {out}. "
                            "Run the same command again to resume.")
    ckpt.finish()
    signal.signal(signal.SIGTERM, prev_handler)
    if progress is not None:
        progress.close()
    reporter.close()
    summary = {"steps": total, "final_loss": loss, "first_loss": first_loss, "world_size": d.world,
               "memory": memory_summary(meter, planned, d)}
    if preference and total > start:
        summary["final_metrics"] = pref_metrics
    save_model_dir(out, model, tokenizer, template, cfg, d, stats, summary)
    if d.main:
        plot_loss(out)
    return out
