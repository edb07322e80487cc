"""The ShareGPT record format: ``{"id", "conversations": [{"from", "value"}], "model"?}``.

Every command reads records through :func:`parse_sample`, which normalises the
role aliases found in the wild and says precisely what is wrong with a bad
record, so all commands agree on what a valid sample is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..files import JSONL_SUFFIXES, RecordError, progress, read_records

log = logging.getLogger(__name__)

HUMAN, GPT, SYSTEM = "human", "gpt", "system"

ROLE_ALIASES = {
    "human": HUMAN, "user": HUMAN, "prompter": HUMAN,
    "gpt": GPT, "assistant": GPT, "chatgpt": GPT, "bing": GPT, "bard": GPT, "model": GPT, "bot": GPT,
    "system": SYSTEM,
}

# Role names of vicuna.conversation templates.
TEMPLATE_ROLE = {HUMAN: "user", GPT: "assistant", SYSTEM: "system"}


@dataclass
class BadSample(Exception):
    """Why a record is not a usable ShareGPT sample (``reason`` is a report key)."""

    reason: str  # short key, e.g. "missing_conversations"
    detail: str  # what exactly is wrong, for humans

    def __str__(self) -> str:
        return self.detail


def normalize_role(role: Any) -> str | None:
    if not isinstance(role, str):
        return None
    return ROLE_ALIASES.get(role.strip().lower())


def parse_sample(obj: Any, record: int) -> dict:
    """Validate one record and return it with normalised roles.

    The result is a new dict ``{"id": str, "conversations": [{"from", "value"}], **other keys}``;
    turns keep only ``from`` and ``value``.  A missing id becomes ``"record{N}"``
    and a numeric id becomes a string.  Raises :class:`BadSample`.
    """
    if not isinstance(obj, dict):
        raise BadSample("not_an_object", f"expected a JSON object, got {_type(obj)}")
    convs = obj.get("conversations")
    if convs is None:
        # a few exports use "items" or "messages" for the same thing
        convs = obj.get("items", obj.get("messages"))
        if convs is None:
            raise BadSample("missing_conversations", "the sample has no 'conversations' list")
    if not isinstance(convs, list):
        raise BadSample("missing_conversations", f"'conversations' must be a list, got {_type(convs)}")
    sid = obj.get("id")
    if sid is None or sid == "":
        sid = f"record{record}"
    elif isinstance(sid, (int, float)) and not isinstance(sid, bool):
        sid = str(sid)
    elif not isinstance(sid, str):
        raise BadSample("bad_id", f"'id' must be a string, got {_type(sid)}")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise BadSample("bad_turn", f"turn {i} is {_type(turn)}, not an object with 'from' and 'value'")
        raw_role = turn.get("from", turn.get("role"))
        role = normalize_role(raw_role)
        if role is None:
            raise BadSample("bad_turn", f"turn {i}: unknown role {raw_role!r}; use human/gpt (or user/assistant)")
        value = turn.get("value", turn.get("content", turn.get("text")))
        if not isinstance(value, str):
            raise BadSample("bad_turn", f"turn {i}: 'value' must be a string, got {_type(value)}")
        turns.append({"from": role, "value": value})
    out = {"id": sid, "conversations": turns}
    for k, v in obj.items():
        if k not in ("id", "conversations", "items", "messages"):
            out[k] = v
    return out


def trim_turns(turns: list[dict]) -> tuple[list[dict], list[dict], tuple[str, ...]]:
    """``(system, exchanges, trimmed)``: a sample's turns as every command uses them.

    ``system`` is the optional first system turn (a list of 0 or 1), ``exchanges`` the
    human/gpt turns that follow, alternating from human and ending on gpt (possibly
    none).  Scraped ShareGPT often starts with the end of an earlier answer and ends
    with an unanswered question; both teach nothing and are dropped (``trimmed`` says
    which: ``leading_gpt_dropped``, ``trailing_human_dropped``).  Any other order —
    including a system turn anywhere but first — raises :class:`BadSample`.
    """
    system = turns[:1] if turns and turns[0]["from"] == SYSTEM else []
    first = len(system)
    trimmed = []
    if len(turns) > first and turns[first]["from"] == GPT:
        first += 1
        trimmed.append("leading_gpt_dropped")
    body = turns[first:]
    for i, turn in enumerate(body):
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            where = f"turn {first + i}"
            if turn["from"] == SYSTEM:  # found by hypothesis: [gpt, system] became a kept system-only sample
                raise BadSample("roles_not_alternating", f"{where} is a system turn; a system turn is only allowed "
                                "first")
            raise BadSample("roles_not_alternating", f"roles do not alternate: {where} is from {turn['from']}, "
                            f"expected {expected}")
    if body and body[-1]["from"] == HUMAN:
        body = body[:-1]
        trimmed.append("trailing_human_dropped")
    return system, body, tuple(trimmed)


def to_messages(turns: list[dict]) -> list[dict]:
    """ShareGPT turns as role/content messages for :mod:`vicuna.conversation`."""
    return [{"role": TEMPLATE_ROLE[t["from"]], "content": t["value"]} for t in turns]


def _type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


class BadRecords:
    """Counts (and with ``strict``, refuses) records that are not valid samples."""

    def __init__(self, path: str, strict: bool = False, keep: int = 100):
        self.path, self.strict, self.keep = str(path), strict, keep
        self._jsonl = str(path).lower().endswith(JSONL_SUFFIXES)
        self.count = 0
        self.reasons: dict[str, int] = {}
        self.examples: list[dict] = []

    def add(self, record: int, line: int | None, reason: str, detail: str) -> None:
        if line is None and self._jsonl:
            line = record  # in JSON lines the record number is the line number
        where = f"record {record}" + (f" (line {line})" if line is not None else "")
        if self.strict:
            raise DataError(f"{self.path}: {where}: {detail} (run without --strict to skip bad records)")
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < self.keep:
            self.examples.append({"record": record, "line": line, "reason": reason, "detail": detail})
        if self.count <= 5:
            log.warning("%s: %s: %s; skipped", self.path, where, detail)

    def to_dict(self) -> dict:
        return {"count": self.count, "reasons": self.reasons, "examples": self.examples}


def iter_samples(path, bad: BadRecords, *, desc: str | None = None):
    """Yield ``(record_number, original_object, parsed_sample)`` for the valid samples of ``path``.

    Unreadable or invalid records go to ``bad`` (counted, skipped; fatal when strict).
    """
    records = read_records(path)
    if desc:
        records = progress(records, desc=desc)
    for n, obj in records:
        if isinstance(obj, RecordError):
            bad.add(n, obj.line, "malformed_record", obj.reason)
            continue
        try:
            yield n, obj, parse_sample(obj, n)
        except BadSample as e:
            bad.add(n, None, e.reason, e.detail)
