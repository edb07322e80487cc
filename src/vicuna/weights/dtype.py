"""Change the dtype of a checkpoint's floating-point weights, one tensor at a time.

Also the way to turn old ``pytorch_model*.bin`` checkpoints into safetensors
(``--dtype`` equal to the current one).  Converting to float16 refuses values
beyond its range instead of silently writing ``inf`` (bfloat16 models often
hold a few such values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WeightsError
from ..files import progress
from .checkpoint import (
    DTYPES,
    Checkpoint,
    ShardWriter,
    atomic_output_dir,
    copy_other_files,
    fingerprint,
    resolve_shard_size,
    set_config_dtype,
)

FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class ConvertReport:
    target: Path
    tensors: int = 0
    converted: int = 0
    files: list[Path] = field(default_factory=list)


def convert(src, dst, dtype: str, *, max_shard_size: str = "auto", force: bool = False) -> ConvertReport:
    want = DTYPES[dtype]
    ck = Checkpoint(src, "input")
    report = ConvertReport(Path(dst))
    shard_bytes = resolve_shard_size(max_shard_size, ck)
    resume = fingerprint("convert", [ck], shard_bytes=shard_bytes, dtype=dtype)
    with atomic_output_dir(dst, force, inputs=(ck.path,), resume=resume) as tmp:
        layout = [(n, i.shape, want if i.dtype.is_floating_point else i.dtype) for n, i in ck.tensors.items()]
        with ShardWriter(tmp, layout, shard_bytes) as writer:
            todo = [n for n in ck.names() if not writer.done(n)]
            report.tensors = len(ck.tensors) - len(todo)
            for name in progress(todo, total=len(todo), desc=f"to {dtype}", unit="tensor"):
                t = ck.get(name)
                if t.is_floating_point() and t.dtype != want:
                    if want == torch.float16:
                        peak = t.abs().nan_to_num(nan=0.0).max().item() if t.numel() else 0.0
                        if peak > FP16_MAX:
                            raise WeightsError(
                                f"tensor {name!r} holds values up to {peak:.4g}, beyond float16's range "
                                f"({FP16_MAX:.0f}); they would become inf. Use --dtype bfloat16 instead"
                            )
                    t = t.to(want)
                    report.converted += 1
                writer.add(name, t)
                report.tensors += 1
            report.files = [report.target / f.name for f in writer.close()]
        copy_other_files(ck.path, tmp)
        set_config_dtype(tmp, want)
    return report
