"""Training data: read conversations, tokenize with exact masks, pack, collate.

Masks come from :func:`vicuna.conversation.tokenize_conversation` (token
offsets of one tokenization of the whole rendered conversation), so there is
no "tokenization mismatch" class of bug to guard against here.

Batches are lists of *rows*; a row is a list of sample indices.  Packing puts
several samples in a row (best-fit decreasing) with ``position_ids`` restarting
per sample and no attention mask: transformers then keeps the samples apart
(block-diagonal causal attention; flash-attention varlen on CUDA).  Targets are
shifted *per sample* here, so no token is ever trained to predict the first
token of the next sample, whatever the model's loss function does.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..conversation import IGNORE_INDEX, TemplateError, UntrainableTemplate, tokenize_conversation
from ..errors import TrainInputError

log = logging.getLogger(__name__)

# ShareGPT "from" values seen in the wild -> OpenAI roles
NO_CONVERSATION = "no 'conversations' or 'messages' key"
PACKING, DYNAMIC = "packing", "dynamic"
BATCHING_MODES = (PACKING, DYNAMIC)


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path, stats: "DataStats | None" = None) -> list[Any]:
    """Records of a JSON array (``.json``) or JSON Lines (``.jsonl``) file, via the data area's streaming reader.

    Unreadable records (malformed JSON, bad UTF-8) are counted in ``stats`` and
    skipped; a file that cannot be read at all is a :class:`TrainInputError`.
    Training keeps every record in memory anyway (packing needs all lengths).
    """
    from ..errors import DataError
    from ..files import RecordError, read_records as stream

    path = Path(path)
    if not path.exists():
        raise TrainInputError(f"--data-path {path}: no such file")
    if path.is_dir():
        raise TrainInputError(f"--data-path {path}: is a directory; pass a .json or .jsonl file")
    records = []
    try:
        for _, rec in stream(path):
            if isinstance(rec, RecordError):
                if stats is not None:
                    stats.records += 1
                    stats.skipped[rec.reason.split(":")[0]] += 1
                continue
            records.append(rec)
    except DataError as e:
        raise TrainInputError(f"--data-path {e}") from None
    return records


def record_to_messages(rec: Any) -> list[dict[str, str]]:
    """OpenAI-style messages from a ShareGPT or ``{"messages": [...]}`` record.

    The record is validated by the data area's :func:`~vicuna.data.sharegpt.parse_sample` and
    trimmed by its :func:`~vicuna.data.sharegpt.trim_turns` (one definition of a valid sample,
    of the role aliases and of the turn order for every command): a leading assistant turn and
    a trailing user turn are dropped, anything else odd raises ``ValueError`` with the reason,
    and the record is skipped.
    """
    from ..data.sharegpt import BadSample, parse_sample, to_messages, trim_turns

    if isinstance(rec, dict) and not any(k in rec for k in ("conversations", "items", "messages")):
        raise ValueError(NO_CONVERSATION)
    try:
        system, exchanges, _ = trim_turns(parse_sample(rec, 0)["conversations"])
    except BadSample as e:
        raise ValueError(e.detail) from None
    if not exchanges:
        raise ValueError("no assistant reply")
    return to_messages(system + exchanges)


@dataclass
class DataStats:
    """What happened to every record; logged, and saved beside the model."""

    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    dropped_long: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common(5))
        return (
            f"{self.kept}/{self.records} conversations kept ({self.tokens} tokens, {self.trained_tokens} trained); "
            f"{self.truncated} truncated, {self.dropped_long} too long and dropped, {skipped} skipped"
            + (f" ({reasons})" if reasons else "")
        )

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = dict(self.skipped)
        return d


@dataclass
class Sample:
    """One tokenized conversation; int32 arrays (a Python list costs 8+ bytes a token, per rank)."""

    input_ids: Any  # np.ndarray[int32] (lists work too)
    labels: Any  # unshifted, IGNORE_INDEX outside assistant outputs

    def __post_init__(self):
        import numpy as np

        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.labels = np.asarray(self.labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.input_ids)


def load_conversations(path: str | Path, stats: DataStats | None = None) -> list[list[dict[str, str]]]:
    """Messages of every usable record; bad records are counted in ``stats``."""
    stats = stats if stats is not None else DataStats()
    records = read_records(path, stats)
    stats.records += len(records)
    if not stats.records:
        raise TrainInputError(f"{path}: the file holds no records")
    convs = []
    for rec in records:
        try:
            convs.append(record_to_messages(rec))
        except ValueError as e:
            stats.skipped[str(e)] += 1
    if not convs:
        if records and (stats.skipped.get(NO_CONVERSATION) == len(records)
                        or all(not isinstance(r, dict) for r in records)):
            raise TrainInputError(
                f"{path}: wrong format: no record has a 'conversations' (ShareGPT) or 'messages' (OpenAI) list"
            )
        raise TrainInputError(f"{path}: no usable conversation ({stats.summary()})")
    return convs


def tokenize_dataset(
    convs: Iterable[Sequence[dict[str, str]]],
    tokenizer: Any,
    template: Any,
    max_length: int,
    *,
    drop_long: bool = False,
    stats: DataStats | None = None,
    source: str = "the data",
) -> list[Sample]:
    """Tokenize every conversation; long ones are truncated at the end (or dropped).

    A conversation the template cannot render is skipped and counted; a tokenizer's own
    chat_template whose assistant spans cannot be found stops everything (:class:`UntrainableTemplate`).
    """
    stats = stats if stats is not None else DataStats()
    samples = []
    for n, msgs in enumerate(convs):
        try:
            tc = tokenize_conversation(tokenizer, template, msgs, max_length=None)
        except UntrainableTemplate as e:  # the template's fault, not this record's: skipping would hide it
            raise TrainInputError(f"{source}: conversation {n}: {e}") from None
        except TemplateError as e:
            stats.skipped[f"template: {e}"] += 1
            continue
        if len(tc.input_ids) > max_length:
            if drop_long:
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            tc.input_ids, tc.labels = tc.input_ids[:max_length], tc.labels[:max_length]
        # the first token predicts nothing within its sample: never train it
        trained = sum(1 for x in tc.labels[1:] if x != IGNORE_INDEX)
        if trained == 0:
            stats.skipped["no assistant token left after truncation"] += 1
            continue
        samples.append(Sample(tc.input_ids, tc.labels))
        stats.tokens += len(tc.input_ids)
        stats.trained_tokens += trained
    stats.kept = len(samples)
    if not samples:
        raise TrainInputError(f"{source}: nothing left to train on after filtering ({stats.summary()})")
    return samples


# ----------------------------------------------------------------------------- packing


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of sample indices, each summing to <= capacity.

    Longest first, each into the fullest row it still fits.  Typically leaves
    well under 5% padding on long-tailed chat lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, r = free.pop(k)
        else:
            rows.append([])
            rem, r = capacity, len(rows) - 1
        rows[r].append(i)
        if rem - n > 0:
            bisect.insort(free, (rem - n, r))
    return rows


def plan_epoch(
    samples: Sequence[Sample], mode: str, micro_batch_size: int, epoch: int, seed: int,
    packed_rows: list[list[int]] | None = None, group_size: int = 64,
) -> list[list[list[int]]]:
    """The epoch's micro-batches (lists of rows of sample indices), deterministic in (seed, epoch).

    The order depends only on (seed, epoch), so a resumed run sees the exact
    batches the interrupted one would have.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if mode == PACKING:
        if packed_rows is None:
            raise ValueError("packing needs packed_rows (from pack_best_fit)")
        rows = list(packed_rows)
        rng.shuffle(rows)
        return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    idx = list(range(len(samples)))
    rng.shuffle(idx)
    if mode == DYNAMIC:
        # length-grouped: sort within mega-batches so each micro-batch has similar lengths
        mega = micro_batch_size * group_size
        grouped = []
        for i in range(0, len(idx), mega):
            grouped += sorted(idx[i:i + mega], key=lambda j: -len(samples[j]))
        mbs = [[[j] for j in grouped[i:i + micro_batch_size]] for i in range(0, len(grouped), micro_batch_size)]
        rng.shuffle(mbs)
        return mbs
    raise ValueError(f"unknown batching mode {mode!r}")


def collate(samples: Sequence[Sample], micro_batch: Sequence[Sequence[int]], pad_id: int, *,
            packed: bool = True) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Returns ``input_ids``, ``position_ids``, ``targets`` (already shifted per
    sample; IGNORE_INDEX where nothing is trained), ``attention_mask`` (only when
    not packed), and counts ``real_tokens`` / ``target_tokens`` / ``computed_tokens``.
    """
    import numpy as np
    import torch

    rows = [[samples[j] for j in row] for row in micro_batch]
    lens = [sum(len(s) for s in row) for row in rows]
    width = max(lens)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    tgt = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        off = 0
        for s in row:
            n = len(s)
            ids[r, off:off + n] = s.input_ids
            tgt[r, off:off + n - 1] = s.labels[1:]  # shifted within the sample; its last target stays ignored
            pos[r, off:off + n] = np.arange(n)
            off += n
        mask[r, :off] = 1
        pos[r, off:] = np.arange(width - off)  # padding forms its own "sample" at the row's end; nothing attends to it
    batch = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "targets": torch.from_numpy(tgt),
        "real_tokens": sum(lens),
        "computed_tokens": width * len(rows),
    }
    batch["target_tokens"] = int((batch["targets"] != IGNORE_INDEX).sum())
    if not packed:
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch
