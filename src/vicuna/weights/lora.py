"""Merge a LoRA adapter into its base model, giving a plain full model.

The merge itself is PEFT's ``merge_and_unload`` — it knows every adapter
variant (rsLoRA scaling, DoRA, fan-in/fan-out layers, modules_to_save) that a
hand-written ``W += B @ A * scale`` would get subtly wrong.  This holds the
whole model in memory once (plus one layer's update at a time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..sizes import parse_size
from .checkpoint import DTYPES, atomic_output_dir

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class MergeReport:
    target: Path
    parameters: int
    tokenizer_from: Path
    resized_to: int | None


def merge_lora(base_path, lora_path, target_path, *, dtype: str | None = None, max_shard_size: str = "5GB",
               force: bool = False) -> MergeReport:
    base_path, lora_path = Path(base_path), Path(lora_path)
    if not (lora_path / "adapter_config.json").is_file():
        raise CheckpointError(f"{lora_path} is not a LoRA adapter folder: adapter_config.json is missing")
    if not (base_path / "config.json").is_file():
        raise CheckpointError(f"{base_path} is not a model folder: config.json is missing")
    shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(target_path, force, inputs=(base_path, lora_path)) as tmp:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A tokenizer saved with the adapter (tokens added in training) wins over the base's.
        tok_dir = lora_path if any((lora_path / f).is_file() for f in TOKENIZER_FILES) else base_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype] if dtype else "auto")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the base model {base_path}: {e}") from None
        resized = None
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:  # the adapter was trained with added tokens
            model.resize_token_embeddings(len(tokenizer))
            resized = len(tokenizer)
            log.info("resized the base embeddings from %d to %d rows for the adapter's tokenizer", rows, resized)
        try:
            model = PeftModel.from_pretrained(model, lora_path).merge_and_unload()
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CheckpointError(
                f"cannot apply the adapter {lora_path} to {base_path}: {str(e).strip()[:800]}\n"
                "Is this the base model the adapter was trained on?"
            ) from None
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
    return MergeReport(Path(target_path), params, tok_dir, resized)
