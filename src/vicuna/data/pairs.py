"""`vicuna data pairs`: preference pairs (prompt, chosen, rejected) from arena votes and preference files.

Every output record is TRL's conversational preference format, so the file also feeds TRL's DPOTrainer::

    {"id": str, "prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "chosen": [{"role": "assistant", "content": str}], "rejected": [{"role": "assistant", "content": str}],
     "source": str, "model_chosen"?: str, "model_rejected"?: str}

``prompt`` ends with a user message and keeps the whole history before it (multi-turn prompts stay multi-turn).

Inputs, told apart by extension and then by each record's keys:

- an arena SQLite database (``.db``/``.sqlite``/``.sqlite3``) written by ``vicuna serve --web``: every vote;
- arena exports (``conversation_a``, ``conversation_b``, ``winner``: FastChat / LMSYS arena dumps and our own);
- ``prompt`` / ``chosen`` / ``rejected`` as strings or message lists (TRL's standard and conversational
  formats, UltraFeedback-binarized where ``chosen`` repeats the prompt; without ``prompt``, the common prefix of
  ``chosen`` and ``rejected`` is the prompt);
- ShareGPT ``conversations`` (``from``/``value``) ending in a human turn, with ``chosen`` / ``rejected`` answers.

In a multi-turn battle each model saw its own earlier answers; the two sides must have asked the same user
messages, and the prompt is the *winner's* history (the rejected answer is the loser's answer to the same last
question).  What is not used is counted by reason: ties, both-bad, voided votes, identical or empty answers,
diverging prompts, malformed records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from ..files import RecordError, RecordWriter, check_output, read_records, write_json
from .sharegpt import TEMPLATE_ROLE, BadRecords, normalize_role

log = logging.getLogger(__name__)

DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class Skip(Exception):
    """This record gives no pair; ``reason`` is the report key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


def _messages(value: Any, what: str) -> list[dict]:
    """A message list in {role, content} form from {role, content} or ShareGPT {from, value} turns."""
    if not isinstance(value, list) or not value:
        raise Skip("malformed_record", f"{what} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise Skip("malformed_record", f"{what}[{i}] is not an object")
        role = normalize_role(m.get("role", m.get("from")))
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            raise Skip("malformed_record", f"{what}[{i}] needs a known role and a string content")
        out.append({"role": TEMPLATE_ROLE[role], "content": content})
    return out


def _answer(value: Any, what: str) -> list[dict]:
    """A chosen/rejected answer: a string, one message, or a message list (whose last message is the answer)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    return _messages(value, what)


def _split_last_answer(msgs: list[dict], what: str) -> tuple[list[dict], str]:
    if msgs[-1]["role"] != "assistant":
        raise Skip("no_answer", f"{what} does not end with an assistant answer")
    if len(msgs) < 2 or msgs[-2]["role"] != "user":
        raise Skip("no_prompt", f"{what} has no user message before its last answer")
    return msgs[:-1], msgs[-1]["content"]


def _pair(prompt: list[dict], chosen: str, rejected: str, **extra) -> dict:
    if not chosen.strip() or not rejected.strip():
        raise Skip("empty_answer", "the chosen or the rejected answer is empty")
    if chosen.strip() == rejected.strip():
        raise Skip("identical_answers", "the chosen and the rejected answers are the same")
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise Skip("no_prompt", "the prompt does not end with a non-empty user message")
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def pair_from_battle(rec: dict) -> dict:
    """One arena vote (``ArenaStore.iter_votes`` shape, or a FastChat arena dump record) as a pair."""
    if rec.get("void"):
        raise Skip("void_vote", f"voided vote ({rec.get('void_reason') or 'no reason given'})")
    winner = rec.get("winner")
    if winner in ("tie", "tie (bothbad)"):
        raise Skip("tie" if winner == "tie" else "both_bad")
    if winner not in ("model_a", "model_b"):
        raise Skip("malformed_record", f"winner must be model_a, model_b, tie or 'tie (bothbad)', not {winner!r}")
    a = _messages(rec.get("conversation_a"), "conversation_a")
    b = _messages(rec.get("conversation_b"), "conversation_b")
    prompt_a, ans_a = _split_last_answer(a, "conversation_a")
    prompt_b, ans_b = _split_last_answer(b, "conversation_b")
    users = lambda p: [m["content"] for m in p if m["role"] != "assistant"]  # noqa: E731
    if users(prompt_a) != users(prompt_b):
        raise Skip("prompts_differ", "the two sides were asked different questions")
    if winner == "model_a":
        return _pair(prompt_a, ans_a, ans_b, model_chosen=rec.get("model_a"), model_rejected=rec.get("model_b"))
    return _pair(prompt_b, ans_b, ans_a, model_chosen=rec.get("model_b"), model_rejected=rec.get("model_a"))


def pair_from_preference(rec: dict) -> dict:
    """prompt/chosen/rejected (TRL, UltraFeedback) or ShareGPT conversations + chosen/rejected as a pair."""
    chosen, rejected = _answer(rec.get("chosen"), "chosen"), _answer(rec.get("rejected"), "rejected")
    prompt_value = rec.get("prompt", rec.get("conversations"))
    if prompt_value is None:  # implicit prompt: the shared beginning of both conversations
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _messages(prompt_value, "prompt")
    for name, ans in (("chosen", chosen), ("rejected", rejected)):
        if len(ans) > 1 and ans[:len(prompt)] == prompt:  # UltraFeedback: the answer repeats the prompt
            ans[:] = ans[len(prompt):]
        if len(ans) != 1 or ans[0]["role"] != "assistant":
            raise Skip("malformed_record", f"{name} must be one assistant answer to the prompt")
    return _pair(prompt, chosen[0]["content"], rejected[0]["content"])


def pair_from_record(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise Skip("malformed_record", "the record is not a JSON object")
    if "conversation_a" in rec or "conversation_b" in rec:
        return pair_from_battle(rec)
    if "chosen" in rec or "rejected" in rec:
        return pair_from_preference(rec)
    raise Skip("malformed_record", "no conversation_a/conversation_b/winner nor chosen/rejected fields")


def _db_records(path: Path) -> Iterator[tuple[int, Any]]:
    from ..serve.arena import ArenaError, ArenaStore

    try:
        store = ArenaStore(path, create=False)
        with store:
            for n, rec in enumerate(store.iter_votes(), 1):
                yield n, rec
    except ArenaError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # sqlite3.DatabaseError: not a database, or another schema
        raise DataError(f"{path}: not an arena database ({e})") from None


def _pair_id(pair: dict) -> str:
    text = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def export_pairs(inputs: list[str], out: str, *, report_path: str | None = None, strict: bool = False,
                 force: bool = False) -> dict:
    """Write the preference pairs of every input to ``out``; returns the report (counts per reason)."""
    if not inputs:
        raise DataError("give at least one input: an arena database or a preference file")
    check_output(out, force=force, inputs=inputs)
    if report_path:
        check_output(report_path, force=force, inputs=inputs + [out])
    report: dict[str, Any] = {"output": str(out), "written": 0, "records": 0, "dropped": {}, "duplicates": 0,
                              "per_input": {}, "bad_records": {}}
    dropped: Counter = Counter()
    seen: set[str] = set()
    with RecordWriter(out, force=force, inputs=inputs) as w:
        for path in inputs:
            p = Path(path)
            if not p.is_file():
                raise DataError(f"{path}: no such file")
            is_db = p.suffix.lower() in DB_SUFFIXES
            records = _db_records(p) if is_db else read_records(p)
            bad = BadRecords(path, strict)
            kept = n_in = 0
            for n, rec in records:
                n_in += 1
                if isinstance(rec, RecordError):
                    bad.add(n, rec.line, "malformed_record", rec.reason)
                    continue
                try:
                    pair = pair_from_record(rec)
                except Skip as e:
                    if e.reason == "malformed_record":
                        bad.add(n, None, e.reason, e.detail)
                    else:
                        dropped[e.reason] += 1
                    continue
                pid = _pair_id(pair)
                if pid in seen:
                    report["duplicates"] += 1
                    continue
                seen.add(pid)
                src_id = rec.get("id", rec.get("question_id", n)) if isinstance(rec, dict) else n
                w.write({"id": f"{p.stem}-{src_id}", **pair, "source": p.name})
                kept += 1
            report["records"] += n_in
            report["per_input"][str(path)] = {"records": n_in, "pairs": kept, "bad_records": bad.count}
            if bad.count:
                report["bad_records"][str(path)] = bad.to_dict()
        report["written"] = w.count
        report["dropped"] = dict(sorted(dropped.items()))
        if w.count == 0:  # raised inside the writer: no empty output file is left behind
            why = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
            n_bad = sum(v["bad_records"] for v in report["per_input"].values())
            raise DataError(f"no preference pairs in {', '.join(map(str, inputs))}: {report['records']} records, "
                            f"not used: {why}; bad records {n_bad}. Each pair needs a prompt and two different, "
                            "non-empty answers, one preferred (see `vicuna data pairs --help`)")
    if report_path:
        write_json(report_path, report)
    why = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    n_bad = sum(v["bad_records"] for v in report["per_input"].values())
    log.info("wrote %d pairs from %d records to %s; not used: %s; duplicates %d; bad records %d",
             report["written"], report["records"], out, why, report["duplicates"], n_bad)
    return report
