"""Delta weights (target = base + delta), as the original Vicuna weights were released.

Both directions check every tensor's presence and shape from the file headers
before any work, so a mismatch fails in seconds, naming the tensor.  A target
with a larger vocabulary (added tokens) keeps its extra embedding rows in the
delta as they are; only the rows the base has are differences.

Exactness: ``(t - b) + b == t`` holds exactly in floating point whenever
``b/2 <= t <= 2b`` (Sterbenz), which is most of a fine-tune, but not all of it:
a weight that moves across zero, or far from a tiny base value, may have no
delta value ``d`` in the dtype with ``b + d == t`` at all (20 steps of SmolLM2
fine-tuning left 71k such values of 134M).  ``make_delta`` therefore checks
the round trip on every value and stores the target value of each one that
would not come back in ``delta_corrections.safetensors`` (flat indices and
values per tensor); ``apply_delta`` puts them back, so the result is bit for
bit the target.  The delta itself stays the plain ``target - base`` that
FastChat's ``apply_delta`` also reads (which then lands within one rounding).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import progress, write_bytes
from .checkpoint import (
    Checkpoint,
    ShardWriter,
    atomic_output_dir,
    copy_other_files,
    fingerprint,
    resolve_shard_size,
)

log = logging.getLogger(__name__)

CORRECTIONS = "delta_corrections.safetensors"
_FIXES_DIR = ".corrections"  # one file per corrected tensor while make-delta runs (kept for a resume)


@dataclass
class DeltaReport:
    target: Path
    tensors: int = 0
    values: int = 0
    extra_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (base rows, new rows)
    corrected_values: int = 0  # values base + delta alone does not give back bit for bit (stored exactly)
    max_error: float = 0.0  # the largest error of base + delta alone on those values
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
    delta = Checkpoint(delta_path, "delta")

    @contextlib.contextmanager
    def add(report: DeltaReport, tmp: Path):
        with _Corrections(delta.path) as fixes:
            def one(name: str, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
                out = fixes.apply(name, _combine(d, b, +1))
                report.corrected_values += fixes.last_count
                return out
            yield one

    return _write_combined("apply-delta", Checkpoint(base_path, "base"), delta, target_path, add,
                           low_mem=low_mem, max_shard_size=max_shard_size, force=force)


def make_delta(base_path, target_path, delta_path, *, low_mem: bool = False, max_shard_size: str = "auto",
               force: bool = False) -> DeltaReport:
    """Write ``target - base`` (with the target's config and tokenizer) to ``delta_path``."""

    @contextlib.contextmanager
    def subtract(report: DeltaReport, tmp: Path):
        def one(name: str, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            d = _combine(t.clone(), b, -1)
            if d.is_floating_point():
                _keep_corrections(report, tmp / _FIXES_DIR, name, t, d, b)  # before the shard can complete
            return d
        yield one
        _merge_corrections(tmp / _FIXES_DIR, tmp / CORRECTIONS)

    return _write_combined("make-delta", Checkpoint(base_path, "base"), Checkpoint(target_path, "target"),
                           delta_path, subtract, low_mem=low_mem, max_shard_size=max_shard_size, force=force)


def _write_combined(verb: str, base: Checkpoint, other: Checkpoint, out_path, combiner, *, low_mem: bool,
                    max_shard_size: str, force: bool) -> DeltaReport:
    """What both verbs share: plan, resume, stream (base, other) tensor pairs through ``combiner``'s function into
    shards laid out as ``other``'s, then copy ``other``'s config and tokenizer. ``combiner(report, tmp)`` is a
    context giving ``one(name, base_tensor, other_tensor) -> tensor``; it closes after the last shard."""
    report = DeltaReport(Path(out_path))
    names = _plan(base, other, report)
    shard_bytes = resolve_shard_size(max_shard_size, other)
    resume = fingerprint(verb, [base, other], shard_bytes=shard_bytes)
    with atomic_output_dir(out_path, force, inputs=(base.path, other.path), resume=resume) as tmp:
        with ShardWriter(tmp, _layout(other, names), shard_bytes) as writer, combiner(report, tmp) as one:
            report.resumed = writer.resumed_tensors
            tensors = _stream(base, other, low_mem, writer.done)
            for name, b, o in progress(tensors, total=len(names) - report.resumed, desc=verb, unit="tensor"):
                writer.add(name, one(name, b, o))
                report.tensors += 1
                report.values += o.numel()
                del b, o
            report.files = writer.close()
        copy_other_files(other.path, tmp)
    report.files = [report.target / f.name for f in report.files]
    return report


def _keep_corrections(report: DeltaReport, folder: Path, name: str, t: torch.Tensor, d: torch.Tensor,
                      b: torch.Tensor) -> None:
    """Save the target values that apply-delta (``d + b`` in d's dtype) would not give back."""
    back = _combine(d.clone(), b, +1)
    head = t if back.shape == b.shape else t[: b.shape[0]]  # extra rows are copied, not computed
    back = back[: head.shape[0]]
    bad = ((back != head) & ~(back.isnan() & head.isnan())).reshape(-1)
    n = int(bad.sum())
    if not n:
        return
    from safetensors.torch import save

    index = bad.nonzero().reshape(-1)  # flat positions; the head rows are the tensor's first values
    report.corrected_values += n
    report.max_error = max(report.max_error, (back.float() - head.float()).abs().reshape(-1)[index].max().item())
    folder.mkdir(exist_ok=True)
    # atomic: a resume after a crash reads every file here
    write_bytes(folder / f"{name}.safetensors", save({"index": index, "value": t.reshape(-1)[index].contiguous()}))


def _merge_corrections(folder: Path, out: Path) -> None:
    """One corrections file from the per-tensor ones (of this run and of an interrupted one)."""
    if not folder.is_dir():
        return
    from safetensors.torch import load_file, save

    merged = {}
    for f in sorted(folder.iterdir()):
        part = load_file(str(f))
        name = f.name.removesuffix(".safetensors")
        merged[f"{name}:index"], merged[f"{name}:value"] = part["index"], part["value"]
    write_bytes(out, save(merged, metadata={"format": "vicuna-delta-corrections"}))
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


class _Corrections:
    """The exact target values a delta carries beside ``target - base`` (none for other deltas)."""

    def __init__(self, delta_path: Path):
        self.path = Path(delta_path) / CORRECTIONS
        self._file = None
        self._names: set[str] = set()
        self.last_count = 0

    def __enter__(self) -> "_Corrections":
        if self.path.is_file():
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
            self._names = {k.rsplit(":", 1)[0] for k in self._file.keys()}
        return self

    def __exit__(self, *exc) -> None:
        self._file = None

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.last_count = 0
        if name not in self._names:
            return x
        index, value = self._file.get_tensor(f"{name}:index"), self._file.get_tensor(f"{name}:value")
        if value.dtype != x.dtype or index.numel() != value.numel() or (index.numel() and index.max() >= x.numel()):
            raise CheckpointError(f"{self.path}: the corrections for tensor {name!r} do not fit it "
                                  f"({index.numel()} values of {value.dtype} for {list(x.shape)} {x.dtype})")
        x.view(-1)[index] = value
        self.last_count = index.numel()
        return x
