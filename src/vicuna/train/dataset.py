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
    unit: str = "conversations"  # or "pairs" (preference data)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common(5))
        return (
            f"{self.kept}/{self.records} {self.unit} kept ({self.tokens} tokens, {self.trained_tokens} trained); "
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


def _records(path: str | Path, stats: DataStats) -> list:
    """The file's records, counted in ``stats``; a file without any is an error."""
    records = read_records(path, stats)
    stats.records += len(records)
    if not stats.records:
        raise TrainInputError(f"{path}: the file holds no records")
    return records


def load_conversations(path: str | Path, stats: DataStats | None = None) -> list[list[dict[str, str]]]:
    """Messages of every usable record; bad records are counted in ``stats``."""
    stats = stats if stats is not None else DataStats()
    records = _records(path, stats)
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


# ----------------------------------------------------------------------------- preference pairs

PROMPT_TOO_LONG = "prompt longer than --max-length"


@dataclass
class PairSample:
    """One preference pair: prompt+chosen and prompt+rejected, labels on the final answer only.

    ``ref_chosen`` / ``ref_rejected`` are the reference model's summed answer log-probs, filled in once before
    training (:func:`vicuna.train.trainer.reference_logps`).
    """

    chosen: Sample
    rejected: Sample
    ref_chosen: float = float("nan")
    ref_rejected: float = float("nan")

    def __len__(self) -> int:  # both sequences always go into the same row
        return len(self.chosen) + len(self.rejected)


def load_pairs(path: str | Path, stats: DataStats | None = None) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen answer, rejected answer) of every usable record of a preference-pair file.

    The records are validated by the data area's :func:`~vicuna.data.pairs.pair_from_record` (so ``vicuna data
    pairs`` output, TRL's formats and UltraFeedback-style records all work); what it rejects is counted.
    """
    from ..data.pairs import Skip, pair_from_record

    stats = stats if stats is not None else DataStats()
    stats.unit = "pairs"
    records = _records(path, stats)
    pairs = []
    for rec in records:
        try:
            p = pair_from_record(rec)
        except Skip as e:
            stats.skipped[e.reason] += 1
            continue
        pairs.append((p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"]))
    if not pairs:
        if records and not any(isinstance(r, dict) and ("chosen" in r or "conversation_a" in r) for r in records):
            raise TrainInputError(
                f"{path}: wrong format for a preference objective: no record has prompt/chosen/rejected (make "
                "pairs with `vicuna data pairs`, or train with --objective sft on conversations)")
        raise TrainInputError(f"{path}: no usable preference pair ({stats.summary()})")
    return pairs


def _final_answer_only(labels: list[int]) -> tuple[list[int], int]:
    """Labels of the last contiguous trained run (the final answer); earlier assistant turns of a multi-turn
    prompt are context, not scored. Returns the labels and the index where the answer starts."""
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end), start


def tokenize_pairs(pairs, tokenizer: Any, template: Any, max_length: int, *, drop_long: bool = False,
                   stats: DataStats | None = None, source: str = "the data") -> list[PairSample]:
    """Tokenize prompt+chosen and prompt+rejected with the SFT masks, scoring only the final answer.

    Each sequence is at most ``max_length`` tokens: a longer answer is cut at its end (or, with ``drop_long``, the
    pair is dropped); a pair whose prompt alone leaves no room for an answer token is refused and counted.
    """
    stats = stats if stats is not None else DataStats(unit="pairs")
    out = []
    for n, (prompt, chosen, rejected) in enumerate(pairs):
        sides = []
        try:
            for answer in (chosen, rejected):
                tc = tokenize_conversation(tokenizer, template,
                                           [*prompt, {"role": "assistant", "content": answer}], max_length=None)
                labels, start = _final_answer_only(list(tc.labels))
                sides.append((list(tc.input_ids), labels, start))
        except UntrainableTemplate as e:
            raise TrainInputError(f"{source}: pair {n}: {e}") from None
        except (TemplateError, ValueError) as e:  # ValueError: no trained token at all
            stats.skipped[f"template: {e}" if isinstance(e, TemplateError) else "no answer token"] += 1
            continue
        if any(start >= max_length for _, _, start in sides):
            stats.skipped[PROMPT_TOO_LONG] += 1
            continue
        if any(len(ids) > max_length for ids, _, _ in sides):
            if drop_long:
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            sides = [(ids[:max_length], labels[:max_length], start) for ids, labels, start in sides]
        pair = PairSample(Sample(sides[0][0], sides[0][1]), Sample(sides[1][0], sides[1][1]))
        out.append(pair)
        stats.tokens += len(pair)
        stats.trained_tokens += sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in (pair.chosen, pair.rejected))
    stats.kept = len(out)
    if not out:
        raise TrainInputError(f"{source}: no preference pair left after filtering ({stats.summary()})")
    return out


def collate_pairs(pairs: Sequence[PairSample], micro_batch: Sequence[Sequence[int]], pad_id: int, *,
                  packed: bool = True) -> dict[str, Any]:
    """:func:`collate` for pairs: each row holds its pairs' chosen and rejected sequences side by side (packed:
    kept apart by ``position_ids``), plus ``segments`` (which sequence each target belongs to: chosen of pair k is
    2k, its rejected 2k+1, in row order; -1 elsewhere), the reference log-probs and the answers' token counts."""
    import torch

    flat = [s for row in micro_batch for j in row for s in (pairs[j].chosen, pairs[j].rejected)]
    rows, k = [], 0
    for row in micro_batch:
        rows.append(list(range(k, k + 2 * len(row))))
        k += 2 * len(row)
    batch = collate(flat, rows, pad_id, packed=packed, segments=True)
    order = [pairs[j] for row in micro_batch for j in row]
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in order], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in order], dtype=torch.float64)
    answer_tokens = torch.tensor([int((s.labels[1:] != IGNORE_INDEX).sum()) for s in flat], dtype=torch.float64)
    batch["chosen_tokens"], batch["rejected_tokens"] = answer_tokens[0::2], answer_tokens[1::2]
    batch["pairs"] = len(order)
    return batch


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
            packed: bool = True, segments: bool = False) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Returns ``input_ids``, ``position_ids``, ``targets`` (already shifted per
    sample; IGNORE_INDEX where nothing is trained), ``attention_mask`` (only when
    not packed), and counts ``real_tokens`` / ``target_tokens`` / ``computed_tokens``; with ``segments``, also
    ``segments``: the index of each target's sample in the micro-batch (in row order), -1 where nothing is trained.
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
    seg = np.full((len(rows), width), -1, dtype=np.int64)
    k = 0
    for r, row in enumerate(rows):
        off = 0
        for s in row:
            n = len(s)
            ids[r, off:off + n] = s.input_ids
            tgt[r, off:off + n - 1] = s.labels[1:]  # shifted within the sample; its last target stays ignored
            seg[r, off:off + n - 1] = np.where(s.labels[1:] != IGNORE_INDEX, k, -1)
            k += 1
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
    if segments:
        batch["segments"] = torch.from_numpy(seg)
    if not packed:
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch
