"""Check that a model folder is complete and runs: shards, checksums, one forward pass.

The header pass (every shard present, complete, matching its index) is cheap
and runs first; the forward pass loads the model with ``transformers`` and
feeds it one templated prompt, so a model that loads but produces NaN fails.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, WeightsError
from .checkpoint import Checkpoint, embedding_rows


@dataclass
class ShardInfo:
    file: str
    bytes: int
    tensors: int
    sha256: str | None


@dataclass
class VerifyReport:
    path: str
    format: str
    parameters: int
    dtypes: dict[str, int]  # dtype -> number of values
    shards: list[ShardInfo] = field(default_factory=list)
    embedding_rows: int | None = None
    tokenizer_size: int | None = None
    forward: dict | None = None


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(model_dir, *, forward: bool = True, checksums: bool = True) -> VerifyReport:
    path = Path(model_dir)
    ck = Checkpoint(path)
    dtypes: Counter[str] = Counter()
    per_file: Counter[Path] = Counter()
    total = 0
    for info in ck.tensors.values():
        n = 1
        for s in info.shape:
            n *= s
        total += n
        dtypes[str(info.dtype).removeprefix("torch.")] += n
        per_file[info.file] += 1
    report = VerifyReport(str(path), ck.format, total, dict(dtypes))
    for f in ck.files:
        report.shards.append(ShardInfo(f.name, f.stat().st_size, per_file[f], sha256_file(f) if checksums else None))
    emb = embedding_rows(ck)
    report.embedding_rows = emb[1] if emb else None
    ck.close()
    if forward:
        report.forward = _forward(path, report)
    return report


def _forward(path: Path, report: VerifyReport) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..conversation import TemplateError, encode, render_prompt, resolve_template

    if not path.is_dir() or not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json, so it cannot be loaded for a forward pass "
                              "(use --no-forward to check only the weight files)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except Exception as e:  # transformers raises many types for broken folders
        raise WeightsError(f"cannot load {path} with transformers: {e}") from None
    model.eval()
    report.tokenizer_size = len(tok)
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    try:
        ids = encode(tok, render_prompt(resolve_template(None, tok, model_name=path.resolve().name), messages, tok))
        prompt = "chat template"
    except TemplateError:
        ids = tok("Hello! Who are you?")["input_ids"]
        prompt = "plain text (no chat template)"
    if not ids:
        raise WeightsError("the tokenizer produced no tokens for the test prompt")
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        raise WeightsError(f"the tokenizer produced id {max(ids)}, beyond the embedding's "
                           f"{model.get_input_embeddings().weight.shape[0]} rows; run `vicuna weights fix-tokens`")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise WeightsError(f"the forward pass produced {bad} NaN/inf logits: the weights are broken")
    top = int(logits[0, -1].argmax())
    return {
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "logits_shape": list(logits.shape),
        "next_token": tok.convert_ids_to_tokens(top),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(model.dtype).removeprefix("torch."),
    }
