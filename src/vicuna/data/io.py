"""Streaming JSON / JSONL records and atomic writes, shared by every area.

The format is chosen by extension: ``.jsonl`` / ``.ndjson`` hold one JSON value
per line, ``.json`` holds one JSON array.  Both are read incrementally, so a
1 GB ShareGPT dump is never held in memory (``json.load`` would hold the text
*and* the objects).

Bad input never stops a reader: :func:`read_records` yields a
:class:`RecordError` (record number, line, reason) in place of the record and
carries on, so commands can count, report and skip it (or stop, with
``--strict``).  Outputs are written to a temporary file next to the target and
renamed into place, so a crash never leaves a half-written file behind and an
existing output is only replaced with ``force=True``.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
CHUNK = 1 << 20  # bytes read at a time from a JSON array


@dataclass(frozen=True)
class RecordError:
    """A record that could not be read: where it is and why."""

    record: int  # 1-based: JSONL line number, or index in the JSON array
    line: int | None
    reason: str

    def where(self) -> str:
        if self.line is None:
            return f"record {self.record}"
        return f"record {self.record} (line {self.line})"

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}"


def record_format(path: str | os.PathLike) -> str:
    """``"jsonl"`` or ``"json"`` from the file extension; anything else is an error."""
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    raise DataError(f"{path}: unknown extension {suffix!r}; use .json (one JSON array) or .jsonl (one record per line)")


# ----------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(record_number, value_or_RecordError)`` for every record of ``path``.

    Never raises for bad records (malformed JSON, invalid UTF-8): those come back
    as :class:`RecordError` and reading continues.  Raises :class:`DataError` only
    when the file itself cannot be read or is not a JSON array / JSON lines.
    """
    fmt = record_format(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        if fmt == "jsonl":
            yield from _read_jsonl(f)
        else:
            yield from _read_json_array(f, str(path))


def count_records(path: str | os.PathLike) -> int:
    """Number of records (good or bad) in ``path``, streaming."""
    return sum(1 for _ in read_records(path))


def _read_jsonl(f) -> Iterator[tuple[int, Any]]:
    loads = json.loads
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, RecordError(lineno, lineno, f"invalid UTF-8 at byte {e.start + 1} of the line")
            continue
        try:
            yield lineno, loads(text)
        except json.JSONDecodeError as e:
            yield lineno, RecordError(lineno, lineno, f"malformed JSON: {e.msg} at column {e.colno}")
        except RecursionError:
            yield lineno, RecordError(lineno, lineno, "malformed JSON: nested too deeply")


_WS = re.compile(r"[ \t\n\r]*")
# Bytes that are not UTF-8 decode (surrogateescape) to lone surrogates U+DC80..U+DCFF.
_BAD_BYTES = re.compile("[\udc80-\udcff]")
# Where a new top-level element may start after a malformed one.
_RESYNC = re.compile(r",[ \t\n\r]*\{")


class _ArrayReader:
    """Incremental parser of one top-level JSON array.

    We keep a text buffer and let ``json.JSONDecoder.raw_decode`` (C speed) parse
    one element at a time, refilling when an element runs past the buffer end.
    Invalid UTF-8 is decoded with ``surrogateescape`` so one bad byte spoils only
    its record, and a syntax error is skipped by resynchronising at the next
    ``, {`` that parses as an object like the records seen before.
    """

    def __init__(self, f, name: str):
        self.f, self.name = f, name
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base = 1  # line number of buf[0]
        self.raw_decode = json.JSONDecoder().raw_decode
        self.keys: frozenset | None = None  # keys of the first good object (for resync)

    def fill(self, want: int = 0) -> bool:
        """Append at least ``want`` more bytes (decoded) to the buffer; False at EOF."""
        if self.eof:
            return False
        if self.pos:
            self.line_base += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        data = self.f.read(max(want, CHUNK))
        if not data:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        self.buf += self.decoder.decode(data)
        return True

    def line_at(self, pos: int) -> int:
        return self.line_base + self.buf.count("\n", 0, pos)

    def skip_ws(self) -> str:
        """Skip whitespace; return the next character ('' at EOF)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if not self.fill():
            raise DataError(f"{self.name}: the file is empty; expected a JSON array of records")
        if self.buf.startswith("\ufeff"):
            self.pos = 1
        first = self.skip_ws()
        if first != "[":
            hint = "; for one record per line use the .jsonl extension" if first == "{" else ""
            raise DataError(f"{self.name}: expected a JSON array ('[' ...) at the start of the file{hint}")
        self.pos += 1
        n = 0
        if self.skip_ws() == "]":
            self.pos += 1
            return self._check_trailing()
        while True:
            n += 1
            item = self.parse_one(n)
            yield n, item
            c = self.skip_ws()
            if c == ",":
                self.pos += 1
                continue
            if c == "]":
                self.pos += 1
                return self._check_trailing()
            if c == "":
                if isinstance(item, RecordError) and self.pos >= len(self.buf):
                    return  # already reported: the file ended inside the bad record
                yield n + 1, RecordError(n + 1, self.line_at(self.pos), "file ends before the closing ']' (truncated?)")
                return
            # garbage between records
            n += 1
            err = RecordError(n, self.line_at(self.pos), f"expected ',' or ']' after record {n - 1}, found {c!r}")
            yield n, err
            if not self.resync():
                return

    def _check_trailing(self):
        if self.skip_ws():
            log.warning("%s: ignoring data after the closing ']' (line %d)", self.name, self.line_at(self.pos))

    def parse_one(self, n: int) -> Any:
        self.skip_ws()
        while True:
            start = self.pos
            try:
                obj, end = self.raw_decode(self.buf, start)
            except json.JSONDecodeError as e:
                if _maybe_truncated(e, self.buf) and self.fill(len(self.buf) - self.pos):
                    continue  # the record runs past the buffer: read more (doubling) and retry
                err = RecordError(n, self.line_at(e.pos), f"malformed JSON: {e.msg}")
                self.pos = max(e.pos, start + 1)
                self.resync()
                return err
            except RecursionError:
                err = RecordError(n, self.line_at(start), "malformed JSON: nested too deeply")
                self.pos = start + 1
                self.resync()
                return err
            if end >= len(self.buf) and not self.eof and not isinstance(obj, (dict, list, str)):
                # a bare number at the buffer end may continue in the next chunk
                if self.fill():
                    continue
            self.pos = end
            if _BAD_BYTES.search(self.buf, start, end):
                return RecordError(n, self.line_at(start), "invalid UTF-8 in the record")
            if self.keys is None and isinstance(obj, dict):
                self.keys = frozenset(obj)
            return obj

    def resync(self) -> bool:
        """Move to the next plausible record start (just before its '{'); False at EOF."""
        while True:
            m = _RESYNC.search(self.buf, self.pos)
            if m is None:
                keep = max(self.pos, len(self.buf) - 64)  # a match may straddle chunks
                self.pos = keep
                if not self.fill():
                    self.pos = len(self.buf)
                    return False
                continue
            brace = m.end() - 1
            try:
                obj, _ = self.raw_decode(self.buf, brace)
            except json.JSONDecodeError as e:
                if _maybe_truncated(e, self.buf) and self.fill(len(self.buf) - self.pos):
                    continue
                self.pos = brace + 1
                continue
            except RecursionError:
                self.pos = brace + 1
                continue
            if isinstance(obj, dict) and (self.keys is None or self.keys & obj.keys()):
                self.pos = m.start()  # at the ',': the main loop then reads the record
                return True
            self.pos = brace + 1


def _maybe_truncated(e: json.JSONDecodeError, buf: str) -> bool:
    """Could this error go away with more input? (Errors from the buffer end, or an open string.)"""
    return e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")


def _read_json_array(f, name: str) -> Iterator[tuple[int, Any]]:
    yield from _ArrayReader(f, name)


# ----------------------------------------------------------------------------- writing


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early (before any work) if ``path`` exists without ``force`` or is an input."""
    out = Path(path)
    for inp in inputs:
        same = Path(inp).resolve() == out.resolve()
        try:
            same = same or (out.exists() and os.path.samefile(out, inp))
        except OSError:
            pass
        if same:
            raise DataError(f"{out} is also given as an input or another output; inputs are never modified, "
                            "choose another path")
    if out.is_dir():
        raise DataError(f"{out} is a directory; give a file path")
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise DataError(f"{out.parent} does not exist; create the directory first")
    return out


class RecordWriter:
    """Write records to ``path`` (JSON array or JSONL by extension) atomically.

    Use as a context manager; records go to a hidden temporary file in the same
    directory, which replaces ``path`` only when the block ends without an
    exception.  A JSON array is written one record per line, so it stays
    greppable and diffable.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Iterable = ()):
        self.path = check_output(path, force=force, inputs=inputs)
        self.fmt = record_format(self.path)
        self.count = 0
        self._f = None
        self._tmp: str | None = None

    def __enter__(self) -> "RecordWriter":
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)
        if self.fmt == "json":
            self._f.write(b"[")
        return self

    def write(self, record: Any) -> None:
        """Serialise and write one record."""
        try:
            data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: keep them, as \\u escapes (still valid JSON)
            data = json.dumps(record).encode("ascii")
        self._write(data)

    def write_json(self, text: str) -> None:
        """Write one record already serialised as JSON text (e.g. by a worker process)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            data = json.dumps(json.loads(text)).encode("ascii")
        self._write(data)

    def _write(self, data: bytes) -> None:
        f = self._f
        if self.fmt == "json":
            f.write(b"\n" if self.count == 0 else b",\n")
        f.write(data)
        if self.fmt == "jsonl":
            f.write(b"\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        f, tmp = self._f, self._tmp
        try:
            if exc_type is None:
                if self.fmt == "json":
                    f.write(b"\n]\n" if self.count else b"]\n")
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, self.path)
                tmp = None
        finally:
            if not f.closed:
                f.close()
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_records(path: str | os.PathLike, records: Iterable[Any], *, force: bool = False,
                         inputs: Iterable = ()) -> int:
    """Write ``records`` (streamed) to ``path`` atomically; returns how many were written."""
    with RecordWriter(path, force=force, inputs=inputs) as w:
        for r in records:
            w.write(r)
    return w.count


def atomic_write_text(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    """Write a small text file (a report, a summary) atomically."""
    out = check_output(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def atomic_write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> Path:
    """Write one JSON document (indented) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", force=force)


# ----------------------------------------------------------------------------- progress


def progress(iterable, *, desc: str, total: int | None = None, unit: str = "rec"):
    """A tqdm progress bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True, mininterval=0.5)
