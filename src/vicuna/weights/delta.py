"""Delta weights (target = base + delta), as the original Vicuna weights were released.

Both directions check every tensor's presence and shape from the file headers
before any work, so a mismatch fails in seconds, naming the tensor.  A target
with a larger vocabulary (added tokens) keeps its extra embedding rows in the
delta as they are; only the rows the base has are differences.

Exactness: ``(t - b) + b == t`` holds exactly in floating point whenever
``b/2 <= t <= 2b`` (Sterbenz), which is the fine-tune case; ``make_delta``
checks the round trip on every tensor and reports values that would not come
back bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import progress
from .checkpoint import (
    Checkpoint,
    ShardWriter,
    atomic_output_dir,
    copy_other_files,
    fingerprint,
    resolve_shard_size,
)

log = logging.getLogger(__name__)


@dataclass
class DeltaReport:
    target: Path
    tensors: int = 0
    values: int = 0
    extra_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (base rows, new rows)
    inexact_values: int = 0  # make-delta only: values that base + delta will not give back bit for bit
    max_error: float = 0.0
    files: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # base tensors with no counterpart
    resumed: int = 0  # tensors already written by an interrupted run of the same command


def _check_pair(name: str, base: Checkpoint, other: Checkpoint) -> bool:
    """True when ``other`` has extra rows; raises on any other mismatch."""
    b, o = base.tensors.get(name), other.tensors[name]
    if b is None:
        raise CheckpointError(
            f"tensor {name!r} is in the {other.label} ({o.file}) but not in the base ({base.path}); "
            "is this the right base model?"
        )
    if b.shape == o.shape:
        return False
    if len(b.shape) >= 1 and len(b.shape) == len(o.shape) and b.shape[1:] == o.shape[1:] and o.shape[0] > b.shape[0]:
        return True  # added tokens: extra embedding / lm_head rows
    raise CheckpointError(
        f"shape mismatch for tensor {name!r}: base {list(b.shape)} ({b.file.name}) vs {other.label} "
        f"{list(o.shape)} ({o.file.name}); the {other.label} was not made from this base model"
    )


def _plan(base: Checkpoint, other: Checkpoint, report: DeltaReport) -> list[str]:
    names = other.names()
    for name in names:
        if _check_pair(name, base, other):
            report.extra_rows[name] = (base.tensors[name].shape[0], other.tensors[name].shape[0])
    report.ignored = [n for n in base.names() if n not in other]
    if report.ignored:
        log.warning("%d base tensors have no counterpart in the %s and are left out: %s",
                    len(report.ignored), other.label, ", ".join(report.ignored[:5]))
    return names


def _layout(ck: Checkpoint, names: list[str]):
    """Output names, shapes and dtypes: those of the delta (apply) or the target (make)."""
    return [(n, ck.tensors[n].shape, ck.tensors[n].dtype) for n in names]


def _combine(x: torch.Tensor, b: torch.Tensor, sign: int) -> torch.Tensor:
    """x[:rows] += sign * b in place, rounding once to x's dtype; extra rows stay as they are."""
    if not (x.is_floating_point() and b.is_floating_point()):
        return x  # integer buffers are not weights to add; keep the newer model's
    head = x[: b.shape[0]] if x.shape != b.shape else x
    if head.dtype == b.dtype:
        head.add_(b, alpha=sign)  # CPU half/bfloat16 kernels compute in float32 and round once
    else:
        head.copy_(torch.add(head.float(), b.float(), alpha=sign))
    return x


def _stream(base: Checkpoint, other: Checkpoint, low_mem: bool, skip):
    """Yield (name, base tensor, other tensor) — one at a time, or from two dicts held in full."""
    names = [n for n in other.names() if not skip(n)]
    if low_mem:
        for name in names:
            yield name, base.get(name), other.get(name)
        return
    bsd, osd = base.load_all(), other.load_all()
    for name in names:
        yield name, bsd.pop(name), osd.pop(name)


def apply_delta(base_path, delta_path, target_path, *, low_mem: bool = False, max_shard_size: str = "auto",
                force: bool = False) -> DeltaReport:
    """Write ``base + delta`` (with the delta's config and tokenizer) to ``target_path``."""
    base, delta = Checkpoint(base_path, "base"), Checkpoint(delta_path, "delta")
    report = DeltaReport(Path(target_path))
    names = _plan(base, delta, report)
    shard_bytes = resolve_shard_size(max_shard_size, delta)
    resume = fingerprint("apply-delta", [base, delta], shard_bytes=shard_bytes)
    with atomic_output_dir(target_path, force, inputs=(base.path, delta.path), resume=resume) as tmp:
        with ShardWriter(tmp, _layout(delta, names), shard_bytes) as writer:
            report.resumed = writer.resumed_tensors
            todo = len(names) - report.resumed
            tensors = _stream(base, delta, low_mem, writer.done)
            for name, b, d in progress(tensors, total=todo, desc="apply-delta", unit="tensor"):
                writer.add(name, _combine(d, b, +1))
                report.tensors += 1
                report.values += d.numel()
                del b, d
            report.files = writer.close()
        copy_other_files(delta.path, tmp)
    report.files = [report.target / f.name for f in report.files]
    return report


def make_delta(base_path, target_path, delta_path, *, low_mem: bool = False, max_shard_size: str = "auto",
               force: bool = False) -> DeltaReport:
    """Write ``target - base`` (with the target's config and tokenizer) to ``delta_path``."""
    base, target = Checkpoint(base_path, "base"), Checkpoint(target_path, "target")
    report = DeltaReport(Path(delta_path))
    names = _plan(base, target, report)
    shard_bytes = resolve_shard_size(max_shard_size, target)
    resume = fingerprint("make-delta", [base, target], shard_bytes=shard_bytes)
    with atomic_output_dir(delta_path, force, inputs=(base.path, target.path), resume=resume) as tmp:
        with ShardWriter(tmp, _layout(target, names), shard_bytes) as writer:
            report.resumed = writer.resumed_tensors
            todo = len(names) - report.resumed
            tensors = _stream(base, target, low_mem, writer.done)
            for name, b, t in progress(tensors, total=todo, desc="make-delta", unit="tensor"):
                d = _combine(t.clone(), b, -1)
                if d.is_floating_point():
                    _count_round_trip(report, t, d, b)
                writer.add(name, d)
                report.tensors += 1
                report.values += d.numel()
                del b, t, d
            report.files = writer.close()
        copy_other_files(target.path, tmp)
    report.files = [report.target / f.name for f in report.files]
    return report


def _count_round_trip(report: DeltaReport, t: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> None:
    """Count values where apply-delta (``d + b`` in d's dtype) would not give ``t`` back."""
    back = _combine(d.clone(), b, +1)
    if back.shape != b.shape:  # extra rows are copied, not computed
        back, t = back[: b.shape[0]], t[: b.shape[0]]
    bad = (back != t) & ~(back.isnan() & t.isnan())
    n = int(bad.sum())
    if n:
        report.inexact_values += n
        report.max_error = max(report.max_error, (back.float() - t.float()).abs()[bad].max().item())
