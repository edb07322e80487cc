"""`vicuna data filter`: keep samples by language, length, source model and repetition.

Language identification uses ``py3langid`` (the langid.py model, bundled, NumPy
only): offline, deterministic, ~6,000 short texts/s on one core.  The recipe used
polyglot/pycld2, which need compiled ICU/CLD2 libraries.
"""

from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass, field

from ..errors import DataError
from .clean import Report
from ..files import RecordWriter, check_output, write_json
from .sharegpt import GPT, HUMAN, SYSTEM, BadRecords, iter_samples

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"https?://\S+")
_DIGIT_RUN = re.compile(r"(\d)\1{8}")  # the recipe's rule: a digit repeated 9+ times
LANG_SAMPLE_CHARS = 1000


def language_text(turns: list[dict]) -> str:
    """The prose of a sample, for language ID: human turns first, code and URLs removed.

    Code blocks read as "English" to a language identifier whatever language the
    conversation is in, and human turns carry the user's language most reliably.
    """
    parts = [t["value"] for t in turns if t["from"] == HUMAN] + [t["value"] for t in turns if t["from"] == GPT]
    out, size = [], 0
    for p in parts:
        p = _URL.sub(" ", _INLINE_CODE.sub(" ", _FENCE.sub(" ", p)))
        out.append(p)
        size += len(p)
        if size >= LANG_SAMPLE_CHARS:
            break
    return "\n".join(out)[:LANG_SAMPLE_CHARS]


_langid = None


def detect_language(text: str) -> str:
    """ISO 639-1 code from py3langid, or ``"unknown"`` for text without letters."""
    global _langid
    if not any(c.isalpha() for c in text):
        return "unknown"
    if _langid is None:
        import py3langid

        _langid = py3langid
    return _langid.classify(text)[0]


def normalize_model(name) -> str:
    """'GPT-4' / 'gpt4' / 'gpt_4' -> 'gpt4'."""
    return re.sub(r"[^a-z0-9.]", "", str(name).lower())


def is_repetitive(turns: list[dict], max_line_repeats: int = 5) -> str | None:
    """Why a sample looks degenerate, or None.

    The recipe dropped a digit repeated 9+ times; we also drop a non-trivial line
    repeated more than ``max_line_repeats`` times in a row (a looping answer).
    """
    for t in turns:
        v = t["value"]
        m = _DIGIT_RUN.search(v)
        if m:
            return f"digit {m.group(1)!r} repeated 9+ times"
        prev, run = None, 0
        for ln in v.split("\n"):
            ln = ln.strip()
            if not ln or not any(c.isalnum() for c in ln):
                continue
            run = run + 1 if ln == prev else 1
            prev = ln
            if run > max_line_repeats:
                return f"line {ln[:40]!r} repeated more than {max_line_repeats} times"
    return None


@dataclass
class FilterConfig:
    keep_lang: frozenset[str] | None = None
    skip_lang: frozenset[str] = frozenset()
    min_turns: int = 0  # messages (human + gpt); an exchange is 2
    max_chars: int | None = None
    model: str | None = None
    reduce_repetition: bool = False

    @property
    def needs_language(self) -> bool:
        return self.keep_lang is not None or bool(self.skip_lang)


@dataclass
class FilterReport(Report):
    """The clean report's counts and examples, plus the languages seen."""

    languages: collections.Counter = field(default_factory=collections.Counter)


def decide(sample: dict, cfg: FilterConfig) -> tuple[str | None, str | None]:
    """(drop reason or None, detected language or None) for one parsed sample."""
    turns = sample["conversations"]
    if cfg.model is not None and normalize_model(sample.get("model", "")) != normalize_model(cfg.model):
        return "model", None
    chat = [t for t in turns if t["from"] != SYSTEM]
    if len(chat) < cfg.min_turns:
        return "min_turns", None
    if cfg.max_chars is not None and sum(len(t["value"]) for t in turns) > cfg.max_chars:
        return "max_chars", None
    lang = None
    if cfg.needs_language:
        lang = detect_language(language_text(turns))
        if cfg.keep_lang is not None and lang not in cfg.keep_lang:
            return "language", lang
        if lang in cfg.skip_lang:
            return "language", lang
    if cfg.reduce_repetition and is_repetitive(turns):
        return "repetition", lang
    return None, lang


def filter_file(inp: str, out: str, cfg: FilterConfig, *, report_path: str | None = None, strict: bool = False,
                force: bool = False) -> FilterReport:
    """Copy the samples of ``inp`` that pass ``cfg`` to ``out`` (records unchanged)."""
    if cfg.keep_lang is not None and not cfg.keep_lang:
        raise DataError("--keep-lang is empty; give codes such as en,zh")
    check_output(out, force=force, inputs=[inp])
    if report_path:
        check_output(report_path, force=force, inputs=[inp, out])
    report = FilterReport(str(inp), str(out))
    bad = BadRecords(inp, strict)
    with RecordWriter(out, force=force, inputs=[inp]) as w:
        for n, obj, sample in iter_samples(inp, bad, desc="filter"):
            report.records += 1
            reason, lang = decide(sample, cfg)
            if lang is not None:
                report.languages[lang] += 1
            if reason:
                report.drop(reason, sample["id"])
            else:
                w.write(obj)
                report.kept += 1
    report.records += bad.count
    if bad.count:
        report.dropped["bad_record"] = bad.count
    log.info("%s", report.summary())
    if report_path:
        write_json(report_path, {
            "input": report.input, "output": report.output, "records": report.records, "kept": report.kept,
            "dropped": dict(report.dropped.most_common()), "examples": report.examples,
            "languages": dict(report.languages.most_common()), "bad_records": bad.to_dict(),
        })
    return report
