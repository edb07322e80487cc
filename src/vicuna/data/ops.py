"""`vicuna data merge | sample | train-test`: streaming file operations on samples.

All three write the records unchanged (only valid samples are kept; bad records
are counted and skipped) and are deterministic for a given ``--seed``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from ..errors import DataError
from ..files import RecordWriter, check_output
from .sharegpt import BadRecords, iter_samples

log = logging.getLogger(__name__)


def merge_files(inputs: list[str], out: str, *, unique_ids: bool = False, strict: bool = False,
                force: bool = False) -> dict:
    """Concatenate ``inputs`` in order into ``out``."""
    if not inputs:
        raise DataError("give at least one input file")
    check_output(out, force=force, inputs=inputs)
    seen: set[str] = set()
    counts = {"written": 0, "duplicate_ids": 0, "bad_records": 0, "per_input": {}}
    with RecordWriter(out, force=force, inputs=inputs) as w:
        for path in inputs:
            bad = BadRecords(path, strict)
            n_in = 0
            for _n, obj, s in iter_samples(path, bad, desc=f"merge {Path(path).name}"):
                n_in += 1
                if s["id"] in seen:
                    counts["duplicate_ids"] += 1
                    if unique_ids:
                        continue
                seen.add(s["id"])
                w.write(obj)
                counts["written"] += 1
            counts["per_input"][str(path)] = n_in
            counts["bad_records"] += bad.count
    if counts["duplicate_ids"]:
        verb = "dropped" if unique_ids else "kept (pass --unique-ids to drop them)"
        log.warning("%d samples repeat an id seen before; %s", counts["duplicate_ids"], verb)
    log.info("wrote %d samples from %d files to %s", counts["written"], len(inputs), out)
    return counts


def sample_file(inp: str, out: str, n: int, *, seed: int = 0, strict: bool = False, force: bool = False) -> int:
    """A uniform random sample of ``n`` samples (reservoir sampling), in input order."""
    if n < 0:
        raise DataError(f"-n must be >= 0, not {n}")
    check_output(out, force=force, inputs=[inp])
    rng = random.Random(seed)
    reservoir: list[tuple[int, object]] = []
    bad = BadRecords(inp, strict)
    total = 0
    for _rec, obj, _s in iter_samples(inp, bad, desc="sample"):
        if len(reservoir) < n:
            reservoir.append((total, obj))
        else:
            j = rng.randrange(total + 1)
            if j < n:
                reservoir[j] = (total, obj)
        total += 1
    if total < n:
        log.warning("%s has only %d samples; writing all of them", inp, total)
    reservoir.sort(key=lambda x: x[0])
    with RecordWriter(out, force=force, inputs=[inp]) as w:
        for _, obj in reservoir:
            w.write(obj)
    log.info("sampled %d of %d samples into %s", len(reservoir), total, out)
    return len(reservoir)


def default_split_paths(inp: str) -> tuple[str, str]:
    p = Path(inp)
    return str(p.with_name(f"{p.stem}_train{p.suffix}")), str(p.with_name(f"{p.stem}_test{p.suffix}"))


def train_test_split(inp: str, *, test_fraction: float = 0.01, seed: int = 0, train_out: str | None = None,
                     test_out: str | None = None, strict: bool = False, force: bool = False) -> tuple[int, int]:
    """Split ``inp`` into train and test files; exactly ``round(N * fraction)`` test samples.

    Two streaming passes (count, then write), so the file is never held in memory.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1 (exclusive), not {test_fraction}")
    d_train, d_test = default_split_paths(inp)
    train_out, test_out = train_out or d_train, test_out or d_test
    if Path(train_out) == Path(test_out):
        raise DataError("the train and test outputs must be different files")
    check_output(train_out, force=force, inputs=[inp])
    check_output(test_out, force=force, inputs=[inp])
    total = sum(1 for _ in iter_samples(inp, BadRecords(inp, strict)))
    k = round(total * test_fraction)
    if total >= 2:
        k = min(max(k, 1), total - 1)  # both sides non-empty
    test_idx = set(random.Random(seed).sample(range(total), k))
    bad = BadRecords(inp, strict)
    with RecordWriter(train_out, force=force, inputs=[inp]) as wtr, \
            RecordWriter(test_out, force=force, inputs=[inp]) as wte:
        for i, (_n, obj, _s) in enumerate(iter_samples(inp, bad, desc="train-test")):
            (wte if i in test_idx else wtr).write(obj)
    if bad.count:
        log.warning("skipped %d bad records", bad.count)
    log.info("%d train samples -> %s, %d test samples -> %s", wtr.count, train_out, wte.count, test_out)
    return wtr.count, wte.count
