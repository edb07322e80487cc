"""`vicuna data clean`: ChatGPT-page HTML to Markdown, debris removal, format checks, de-duplication.

One sample goes through :meth:`Cleaner.clean` (pure, picklable configuration);
:func:`clean_file` streams a file through it on N worker processes with ordered
output, de-duplicates in the parent (so the result does not depend on N) and
writes a report of every drop reason with example ids.

Cleaning is idempotent: each value is brought to a fixed point of the text
repairs, and converted HTML that itself looks like page HTML is escaped, so
cleaning the output again changes nothing (a hypothesis test checks this).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ..errors import DataError
from ..files import RecordError, RecordWriter, check_output, progress, read_records, record_format, write_json
from .html2md import html_to_markdown, looks_like_html
from .sharegpt import GPT, SYSTEM, BadSample, parse_sample, trim_turns

log = logging.getLogger(__name__)

# The Vicuna recipe dropped samples that mention where the answers came from, so
# the model does not learn to call itself ChatGPT.
DEFAULT_BLOCKED_WORDS = ("openai", "chatgpt")

# Replies that are the ChatGPT page's error messages, not answers.
ERROR_REPLIES = (
    "Too many requests in 1 hour. Try again later.",
    "Too many requests, please slow down",
    "Network error",
    "An error occurred. If this issue persists please contact us through our help center",
    "Something went wrong, please try reloading the conversation.",
    "Something went wrong. If this issue persists please contact us through our help center",
    "There was an error generating a response",
    "Hmm...something seems to have gone wrong.",
    "The message you submitted was too long, please reload the conversation and submit something shorter.",
    "Only one message at a time. Please allow any other responses to complete before sending another message",
    "Error in body stream",
    "Load failed",
    "Conversation not found",
    "The server had an error while processing your request.",
)

# Reasons that mean "this record is not a valid sample" (fatal with --strict),
# as opposed to content decisions (blocked words, duplicates, ...).
FORMAT_REASONS = frozenset({"malformed_record", "not_an_object", "missing_conversations", "bad_id", "bad_turn"})

# The page's "2 / 2" regenerate counter, glued to the text that follows ("2 / 2Write a ...",
# "1 / 1<div ...") or alone; "3 / 4 cups" and "1 / 2 = 0.5" are content.
_COUNTER = re.compile(r"^\s*\d{1,3} / \d{1,3}(?=[^\s\d/.,]|$)")
_COPY_CHARS = re.compile(r"Copy ?\d+ chars? / \d+ words?")
_COPY_CODE = re.compile(r"(```[^\s`]*)[ \t]*Copy code[ \t]*\n?")  # "```pythonCopy code..." (text captures)
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CleanConfig:
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS
    min_chars: int = 16  # samples with fewer characters in all turns are dropped (as the recipe did)


@dataclass
class Outcome:
    """What happened to one sample."""

    sample: dict | None  # the cleaned sample, or None when dropped
    reason: str = "kept"
    detail: str = ""
    id: str | None = None
    changes: tuple[str, ...] = ()


def load_blocked_words(path: str) -> tuple[str, ...]:
    """One word or phrase per line; blank lines and '#' comments are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            words = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read blocked words from {path}: {e}") from None
    return tuple(w for w in words if w and not w.startswith("#"))


def fix_text(value: str) -> str:
    """Remove page debris from plain text (one pass; :func:`clean_value` iterates)."""
    value = _COUNTER.sub("", value, count=1)
    if "Copy" in value:
        value = _COPY_CHARS.sub("", value)
        value = _COPY_CODE.sub(lambda m: m.group(1) + "\n", value)
    return value.strip()


def clean_value(value: str, is_gpt: bool) -> tuple[str, bool]:
    """Cleaned text of one turn and whether it was converted from HTML.

    Only assistant turns are parsed as HTML: human turns are what the user typed,
    and HTML a user typed is content.
    """
    converted = False
    if is_gpt:
        stripped = _COUNTER.sub("", value, count=1)
        if looks_like_html(stripped):
            value, converted = html_to_markdown(stripped), True
    for _ in range(8):  # a fixed point is reached in one or two passes
        new = fix_text(value)
        if is_gpt and looks_like_html(new):
            new = "\\" + new  # literal page-like HTML in an answer: never re-parse it
        if new == value:
            break
        value = new
    return value, converted


class Cleaner:
    """Cleans one sample at a time; cheap to build in each worker process."""

    def __init__(self, config: CleanConfig = CleanConfig()):
        self.config = config
        self._words = tuple(dict.fromkeys(w.lower() for w in config.blocked_words if w))
        # a handful of words: `in` on the lower-cased text beats an IGNORECASE regex; many: one regex
        self._blocked = re.compile("|".join(map(re.escape, self._words))) if len(self._words) > 16 else None

    def blocked_word(self, text: str) -> str | None:
        """The first blocked word in ``text`` (case-insensitive), or None."""
        if not self._words:
            return None
        low = text.lower()
        if self._blocked is not None:
            m = self._blocked.search(low)
            return m.group(0) if m else None
        for w in self._words:
            if w in low:
                return w
        return None

    def clean(self, obj: Any, record: int) -> Outcome:
        sid = obj.get("id") if isinstance(obj, dict) else None
        sid = sid if isinstance(sid, str) else None
        try:
            sample = parse_sample(obj, record)
            sid = sample["id"]
            return self._clean(sample)
        except BadSample as e:
            return Outcome(None, e.reason, e.detail, sid)
        except RecursionError:
            return Outcome(None, "clean_error", "HTML nested too deeply to convert", sid)
        except Exception as e:  # one pathological sample must not end a run over a million  # noqa: BLE001
            log.warning("sample %s (record %d): unexpected %s: %s", sid, record, type(e).__name__, e)
            return Outcome(None, "clean_error", f"{type(e).__name__}: {e}", sid)

    def _clean(self, sample: dict) -> Outcome:
        system, body, trimmed = trim_turns(sample["conversations"])
        changes = list(trimmed)
        if not body:
            raise BadSample("too_short", "no complete human/gpt exchange")
        out_turns = []
        chars = 0
        for i, turn in enumerate(system + body):
            is_gpt = turn["from"] == GPT
            value, converted = clean_value(turn["value"], is_gpt)
            if converted:
                changes.append("html_converted")
            where = f"turn {i} ({turn['from']})"
            if not value.isascii() and _LONE_SURROGATE.search(value):
                raise BadSample("invalid_unicode", f"{where} contains a lone surrogate (broken UTF-16)")
            if not value.strip(_ZERO_WIDTH).strip():
                raise BadSample("empty_turn", f"{where} is empty")
            if is_gpt and value.lstrip("!").startswith(ERROR_REPLIES):
                raise BadSample("error_page", f"{where} is a ChatGPT error message: {value[:60]!r}")
            word = self.blocked_word(value)
            if word:
                raise BadSample("blocked_words", f"{where} contains {word!r}")
            chars += len(value)
            out_turns.append({"from": turn["from"], "value": value})
        if chars < self.config.min_chars:
            raise BadSample("too_short", f"{chars} characters in all turns (minimum {self.config.min_chars})")
        out = {"id": sample["id"], "conversations": out_turns}
        out.update((k, v) for k, v in sample.items() if k not in out)
        return Outcome(out, id=sample["id"], changes=tuple(changes))


def dedup_key(sample: dict) -> bytes:
    """Hash of the first human/gpt exchange (after cleaning)."""
    turns = [t for t in sample["conversations"] if t["from"] != SYSTEM][:2]
    h = hashlib.blake2b(digest_size=16)
    for t in turns:
        h.update(t["value"].encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.digest()


# ----------------------------------------------------------------------------- workers

_WORKER: Cleaner | None = None


def _init_worker(config: CleanConfig, pool_worker: bool = False, parent: int | None = None) -> None:
    global _WORKER
    _WORKER = Cleaner(config)
    if pool_worker:
        # Ctrl-C and SIGTERM are the parent's business: it stops the pool and removes the partial output
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with(parent)


def _die_with(parent: int | None) -> None:
    """Have the kernel kill this worker when its parent goes (Linux). ``Pool.terminate`` races the pool's own
    thread, which may fork replacement workers as it kills the old ones; those outlived a SIGTERMed `data clean`,
    waiting forever on the task queue and holding its stderr open."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such guard
        return
    if parent is not None and os.getppid() != parent:  # the parent went before the guard was set
        os._exit(1)


def _clean_batch(batch: list[tuple[int, Any]]) -> list[tuple]:
    """Worker side: clean and serialise, so the parent only de-duplicates and writes."""
    out = []
    for n, obj in batch:
        o = _WORKER.clean(obj, n)
        if o.sample is None:
            out.append((n, None, None, o.reason, o.detail, o.id, o.changes))
        else:
            text = json.dumps(o.sample, ensure_ascii=False)
            out.append((n, text, dedup_key(o.sample), o.reason, "", o.id, o.changes))
    return out


def _batches(records: Iterable[tuple[int, Any]], size: int) -> Iterator[list]:
    batch = []
    for item in records:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_parallel(func, batches: Iterator[list], workers: int, config: CleanConfig) -> Iterator[list]:
    """Map ``func`` over batches on a process pool, in order, with bounded look-ahead.

    ``Pool.imap`` would read the whole input ahead into its task queue; here at
    most ``4 * workers`` batches are in flight, so memory stays flat on any input.
    """
    if workers <= 1:
        _init_worker(config)
        for b in batches:
            yield func(b)
        return
    # fork: workers start in milliseconds and need no re-import of `python -m vicuna`
    # (spawn/forkserver would re-run __main__); the pool starts before any thread.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(config, True, os.getpid())) as pool:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(func, (b,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- file


@dataclass
class Report:
    """Counts of what happened, with example ids per reason; written as JSON."""

    input: str
    output: str
    records: int = 0
    kept: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)
    changes: collections.Counter = field(default_factory=collections.Counter)
    bad_records: list = field(default_factory=list)
    max_examples: int = 5

    def drop(self, reason: str, example: str, record: int = 0, detail: str = "", line: int | None = None) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)
        if reason in FORMAT_REASONS and len(self.bad_records) < 100:
            self.bad_records.append({"record": record, "line": line, "reason": reason, "detail": detail})

    def to_dict(self) -> dict:
        return {
            "input": self.input, "output": self.output, "records": self.records, "kept": self.kept,
            "dropped_total": sum(self.dropped.values()),
            "dropped": dict(self.dropped.most_common()),
            "examples": {k: self.examples[k] for k, _ in self.dropped.most_common()},
            "changes": dict(self.changes.most_common()),
            "bad_records": self.bad_records,
        }

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.most_common()) or "none"
        return f"kept {self.kept} of {self.records} samples; dropped: {drops}"


def clean_file(inp: str, out: str, *, config: CleanConfig = CleanConfig(), workers: int = 1,
               report_path: str | None = None, strict: bool = False, force: bool = False,
               batch_size: int = 128) -> Report:
    """Clean ``inp`` into ``out`` (streamed, atomic); returns the report."""
    check_output(out, force=force, inputs=[inp])
    if report_path:
        check_output(report_path, force=force, inputs=[inp, out])
    report = Report(str(inp), str(out))
    jsonl = record_format(inp) == "jsonl"
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    def feed() -> Iterator[tuple[int, Any]]:
        for n, obj in progress(read_records(inp), desc="clean"):
            report.records += 1
            if isinstance(obj, RecordError):
                if strict:
                    raise DataError(f"{inp}: {obj}")
                report.drop("malformed_record", obj.where(), n, obj.reason, obj.line)
                continue
            yield n, obj

    with RecordWriter(out, force=force, inputs=[inp]) as writer:
        for results in _ordered_parallel(_clean_batch, _batches(feed(), batch_size), workers, config):
            for n, text, key, reason, detail, sid, changes in results:
                report.changes.update(changes)
                if text is None:
                    line = n if jsonl else None  # in JSON lines the record number is the line number
                    if strict and reason in FORMAT_REASONS:
                        raise DataError(f"{inp}: record {n}" + (f" (line {line})" if line else "") + f": {detail}")
                    report.drop(reason, sid or f"record {n}", n, detail, line)
                    continue
                if sid in seen_ids:
                    report.drop("duplicate_id", sid, n)
                    continue
                if key in seen_keys:
                    report.drop("duplicate_content", sid, n)
                    continue
                seen_ids.add(sid)
                seen_keys.add(key)
                writer.write_json(text)
                report.kept += 1
    log.info("%s", report.summary())
    if report_path:
        write_json(report_path, report.to_dict())
    return report
