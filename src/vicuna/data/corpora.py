"""`vicuna data convert --from alpaca|chatterbot`: other corpora as ShareGPT conversations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..files import RecordError, RecordWriter, check_output, progress, read_records
from .sharegpt import BadRecords

log = logging.getLogger(__name__)

SOURCES = ("alpaca", "chatterbot")


def alpaca_records(path: str, bad: BadRecords) -> Iterator[dict]:
    """``{instruction, input?, output}`` -> one exchange; the input follows the instruction."""
    for n, obj in progress(read_records(path), desc="convert"):
        if isinstance(obj, RecordError):
            bad.add(n, obj.line, "malformed_record", obj.reason)
            continue
        if not isinstance(obj, dict):
            bad.add(n, None, "not_an_object", f"expected an object with instruction/output, got {type(obj).__name__}")
            continue
        inst, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if not isinstance(inst, str) or not inst.strip():
            bad.add(n, None, "bad_alpaca", "'instruction' must be a non-empty string")
            continue
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            bad.add(n, None, "bad_alpaca", "'input' must be a string")
            continue
        if not isinstance(out, str) or not out.strip():
            bad.add(n, None, "bad_alpaca", "'output' must be a non-empty string")
            continue
        question = inst.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
        sid = obj.get("id")
        yield {
            "id": str(sid) if isinstance(sid, (str, int)) and sid != "" else f"alpaca_{n}",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": out.strip()}],
        }


def chatterbot_dir() -> Path:
    """The English YAML files of the installed ``chatterbot-corpus`` package."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("chatterbot-corpus is not installed; `pip install chatterbot-corpus` "
                        "(or `pip install vicuna[demo]`), or pass the corpus directory") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def chatterbot_records(directory: str | None, bad: BadRecords) -> Iterator[dict]:
    """Each ``conversations:`` list of alternating lines -> one conversation.

    A trailing line without an answer is dropped; a one-line "conversation" is
    skipped (and counted as a bad record).
    """
    import yaml

    root = Path(directory) if directory else chatterbot_dir()
    if not root.is_dir():
        raise DataError(f"{root} is not a directory of chatterbot YAML files")
    files = sorted(p for p in root.iterdir() if p.suffix in (".yml", ".yaml"))
    if not files:
        raise DataError(f"no .yml files in {root}")
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            bad.add(0, None, "bad_yaml", f"{path.name}: {e}")
            continue
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            bad.add(0, None, "bad_yaml", f"{path.name}: no 'conversations' list")
            continue
        for i, lines in enumerate(convs):
            if not isinstance(lines, list):
                lines = [lines]
            lines = [str(x).strip() for x in lines if x is not None and str(x).strip()]
            lines = lines[: len(lines) // 2 * 2]
            if not lines:
                bad.add(i + 1, None, "too_short", f"{path.name}: conversation {i + 1} has no answer")
                continue
            yield {
                "id": f"chatterbot_{path.stem}_{i}",
                "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(lines)],
            }


def convert(source: str, inp: str | None, out: str, *, strict: bool = False, force: bool = False) -> int:
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "alpaca" and not inp:
        raise DataError("--from alpaca needs an input file (JSON or JSONL with instruction/input/output)")
    check_output(out, force=force, inputs=[inp] if inp and Path(inp).is_file() else [])
    bad = BadRecords(inp or "chatterbot-corpus", strict)
    records = alpaca_records(inp, bad) if source == "alpaca" else chatterbot_records(inp, bad)
    with RecordWriter(out, force=force, inputs=[inp] if inp and Path(inp).is_file() else []) as w:
        for r in records:
            w.write(r)
    log.info("wrote %d conversations to %s%s", w.count, out, f"; skipped {bad.count} bad records" if bad.count else "")
    return w.count
