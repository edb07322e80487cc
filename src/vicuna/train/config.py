"""Training settings: one dataclass, filled from defaults < YAML recipe < flags.

Every field is both a recipe key (``snake_case``) and a flag (``--kebab-case``),
so a recipe is just the flags you would otherwise type.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainInputError


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model_path: str | None = _f(None, "base model: a Hugging Face model directory (or hub id when online)")
    model_init: dict | None = _f(None, "recipe only: build a fresh tiny LLaMA instead of loading --model-path, "
                                       "e.g. {from_tokenizer: DIR, hidden_size: 64, num_layers: 2}", cli=False)
    data_path: str | None = _f(None, "training conversations, ShareGPT or {messages: [...]}, .json or .jsonl; with "
                                     "a preference --objective: preference pairs (`vicuna data pairs` output)")
    output_dir: str | None = _f(None, "where the model, checkpoints and logs go")
    conv_template: str | None = _f(None, "conversation template (see `vicuna templates list`); "
                                         "default: the one embedded in the base tokenizer")
    objective: str = _f("sft", "sft: next-token loss on the assistant's answers; dpo (= sigmoid), ipo or hinge: "
                               "preference tuning on prompt/chosen/rejected pairs against the base model as reference",
                        choices=("sft", "dpo", "sigmoid", "ipo", "hinge"))
    beta: float = _f(0.1, "preference objectives: how far the policy may move from the reference (higher: closer)")
    # data
    max_length: int = _f(2048, "tokens per sample (and per packed row; with a preference objective, per sequence, "
                               "a packed row holding up to twice this: each pair stays in one row)")
    packing: bool = _f(True, "pack several samples per row (padding-free); --no-packing: length-grouped "
                             "dynamic padding")
    drop_long: bool = _f(False, "drop samples longer than --max-length instead of truncating them at the end")
    # schedule
    num_epochs: float = _f(3.0, "passes over the data")
    max_steps: int = _f(-1, "stop after this many optimizer steps (overrides --num-epochs when > 0)")
    per_device_batch_size: int = _f(1, "rows per micro-batch on each process (a packed row holds several samples)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step; global batch = per-device x "
                                             "accumulation x world size")
    learning_rate: float = _f(2e-5, "peak learning rate")
    lr_scheduler: str = _f("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.03, "share of steps spent warming up linearly")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to norms and biases)")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    seed: int = _f(42, "seed for initialisation, data order and dropout")
    # compute
    precision: str = _f("auto", "auto: bf16 on CUDA when supported, else fp32", choices=("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (saves memory, ~30%% slower)")
    attn_implementation: str = _f("auto", "auto: flash_attention_2 on CUDA when installed, else sdpa",
                                  choices=("auto", "sdpa", "eager", "flash_attention_2"))
    fsdp: str = _f("auto", "under torchrun: full_shard (FSDP2, one unit per decoder layer) or none (DDP); "
                           "auto: full_shard", choices=("auto", "full_shard", "none"))
    fsdp_cpu_offload: bool = _f(False, "keep FSDP parameters and optimizer state on the CPU")
    rope_scaling: str | None = _f(None, "allow --max-length beyond the model's positions, e.g. linear:2 or dynamic:4")
    # LoRA
    lora: bool = _f(False, "train a LoRA adapter instead of all weights; saves only the adapter")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target: str = _f("all-linear", "modules to adapt: all-linear or a comma list such as q_proj,v_proj")
    qlora: bool = _f(False, "CUDA only: load the base in 4-bit (bitsandbytes) and train LoRA on it")
    # checkpoints and logs
    save_steps: int = _f(500, "write a checkpoint every N optimizer steps (0: only on SIGTERM)")
    save_total_limit: int = _f(2, "keep this many newest checkpoints")
    async_save: bool = _f(False, "write periodic checkpoints in the background (DCP async_save) while training goes "
                                 "on; costs one more copy of each rank's model + optimizer shard in host RAM. "
                                 "The SIGTERM checkpoint is always written before exiting")
    resume: str = _f("auto", "auto: continue from the newest complete checkpoint in --output-dir; never; "
                             "or a checkpoint directory")
    logging_steps: int = _f(1, "log every N optimizer steps")
    report_to: str = _f("none", "also log to tensorboard or wandb", choices=("none", "tensorboard", "wandb"))
    peak_tflops: float | None = _f(None, "accelerator peak TFLOP/s for the MFU estimate (default: looked up for "
                                         "known GPUs, rough estimate on CPU)")
    force: bool = _f(False, "write into an --output-dir that already holds a finished model (and with "
                            "--resume never, delete its checkpoints)")
    throttle: float = _f(0.0, argparse.SUPPRESS)  # seconds of sleep per step: lets tests kill a tiny run mid-way

    @property
    def preference(self) -> bool:
        return self.objective != "sft"

    @property
    def batching(self) -> str:
        return "packing" if self.packing else "dynamic"


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise TrainInputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TrainInputError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TrainInputError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise TrainInputError(f"--config {path}: unknown setting {key!r}; known: {', '.join(FIELDS)}")
        out[name] = value
    return out


def make_config(recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, *,
                planning: bool = False) -> TrainConfig:
    """Defaults < recipe < overrides, type-checked (``planning``: for --dry-run, no data or output needed)."""
    values: dict[str, Any] = {}
    for src in (recipe or {}, overrides or {}):
        values.update({k: v for k, v in src.items() if k in FIELDS})
    for name, value in values.items():
        default = FIELDS[name].default
        kind = float if name == "peak_tflops" else (str if name == "rope_scaling" else type(default))
        if value is None or default is None and kind is type(None) or isinstance(value, dict):
            continue
        try:
            values[name] = _bool(value, name) if kind is bool else kind(value)
        except (TypeError, ValueError):
            raise TrainInputError(f"setting {name}: expected {kind.__name__}, got {value!r}") from None
        choices = FIELDS[name].metadata.get("choices")
        if choices and values[name] not in choices:
            raise TrainInputError(f"setting {name}: {value!r} is not one of {', '.join(choices)}")
    cfg = TrainConfig(**values)
    validate(cfg, planning=planning)
    return cfg


def _bool(v, name):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(name)


def validate(cfg: TrainConfig, planning: bool = False) -> None:
    if not cfg.data_path and not planning:
        raise TrainInputError("--data-path is required (ShareGPT .json or .jsonl)")
    if not cfg.output_dir and not planning:
        raise TrainInputError("--output-dir is required")
    if not cfg.model_path and not cfg.model_init:
        raise TrainInputError("--model-path is required (or model_init in a recipe)")
    for name in ("max_length", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise TrainInputError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.beta <= 0:
        raise TrainInputError("--beta must be > 0")
    if cfg.learning_rate <= 0:
        raise TrainInputError("--learning-rate must be > 0")
    if not 0 <= cfg.warmup_ratio < 1:
        raise TrainInputError("--warmup-ratio must be in [0, 1)")
    if cfg.max_steps <= 0 and cfg.num_epochs <= 0:
        raise TrainInputError("set --num-epochs > 0 or --max-steps > 0")
    if cfg.qlora and not cfg.lora:
        cfg.lora = True
    if cfg.rope_scaling:
        parse_rope_scaling(cfg.rope_scaling)
    if cfg.model_init is not None and not isinstance(cfg.model_init, dict):
        raise TrainInputError("model_init must be a mapping, e.g. {from_tokenizer: DIR, hidden_size: 64}")


def parse_rope_scaling(spec: str) -> tuple[str, float | None]:
    kind, _, factor = spec.partition(":")
    if kind not in ("linear", "dynamic", "yarn"):
        raise TrainInputError(f"--rope-scaling {spec!r}: use linear:FACTOR, dynamic:FACTOR or yarn:FACTOR")
    try:
        return kind, float(factor) if factor else None
    except ValueError:
        raise TrainInputError(f"--rope-scaling {spec!r}: the factor must be a number") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are SUPPRESSed so only given flags override a recipe."""
    p.add_argument("--config", default=None, help="YAML recipe (see recipes/); flags override its settings")
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if help is not argparse.SUPPRESS and f.default is not None and not isinstance(f.default, bool):
            help = f"{help} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help if help is argparse.SUPPRESS else f"{help} (default: {f.default})")
        else:
            kind = float if isinstance(f.default, float) or f.name == "peak_tflops" else (
                int if isinstance(f.default, int) else str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"), help=help,
                           metavar=None if f.metadata.get("choices") else f.name.upper().split("_")[-1])


def config_from_args(args: argparse.Namespace, planning: bool = False) -> TrainConfig:
    recipe = load_recipe(args.config) if getattr(args, "config", None) else {}
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    return make_config(recipe, overrides, planning=planning)
