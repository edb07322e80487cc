"""Files: atomic writes, streaming JSON / JSONL records, progress bars — one implementation for every area.

Writing: everything goes to a temporary file in the target's folder, which is
flushed, fsynced and renamed over the target (then the folder is fsynced), so a
reader sees the old file or the new one, never half of one, even after a crash or a
power cut.  On any failure — an exception, a full disk, Ctrl-C, SIGTERM (see
:func:`raise_on_sigterm`) — the temporary file is removed, and a full disk or a
read-only place is reported as an :class:`~vicuna.errors.OutputError` naming the file.

Reading: the format comes from the extension: ``.jsonl`` / ``.ndjson`` hold one JSON
value per line, ``.json`` one JSON array.  Both are read incrementally, so a 1 GB
ShareGPT dump is never held in memory (``json.load`` would hold the text *and* the
objects).  Bad records never stop a reader: :func:`read_records` yields a
:class:`RecordError` (record number, line, reason) in place of the record and
carries on, so commands can count, report and skip it (or stop, with ``--strict``).

Why our own: the atomic write is a few lines of the standard library, and the packages
for it either stopped being maintained or skip the folder fsync; streaming JSON parsers
(ijson, json-stream) stop at the first syntax error, where a scraped dump needs the bad
record skipped and the rest read, at the C decoder's speed.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import DataError, OutputError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
CHUNK = 1 << 20  # bytes read at a time from a JSON array


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, permissions: int | None = None,
                replace: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; it becomes ``path`` only when the block ends without an error.

    ``mode`` is "w" (UTF-8 text) or "wb".  ``permissions`` default to what a plain
    ``open`` would give (0666 less the umask); secrets pass 0o600.  With
    ``replace=False`` an existing ``path`` is never replaced (``FileExistsError``):
    the file is linked into place, so of two processes racing, one wins whole.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(e, path) from None
    f = None
    try:
        f = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8", buffering=1 << 20)
        try:
            yield f
        except OSError as e:  # the caller's writes: only a full disk is ours to explain
            raise (_output_error(e, path) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e) from None
        if _terminated.is_set():  # SIGTERM's exception was swallowed somewhere: never commit after it
            raise Terminated()
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(tmp, _default_permissions() if permissions is None else permissions)
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # FileExistsError when another process was first
                os.unlink(tmp)
            tmp = None
        except FileExistsError:
            raise
        except OSError as e:
            raise _output_error(e, path) from None
        fsync_dir(path.parent)
    finally:
        if f is None:
            os.close(fd)
        elif not f.closed:
            with contextlib.suppress(OSError):  # flushing what is about to be deleted may fail (disk full)
                f.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, **options) -> Path:
    """Write a text file (UTF-8) atomically; ``options`` as for :func:`atomic_open`."""
    with atomic_open(path, "w", **options) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, **options) -> Path:
    """Write a binary file atomically; ``options`` as for :func:`atomic_open`."""
    with atomic_open(path, "wb", **options) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, default=None) -> Path:
    """Write one JSON document (indented, UTF-8) atomically; ``default`` as for ``json.dumps``."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=default) + "\n")


def write_figure(path: str | os.PathLike, fig, **savefig) -> Path:
    """Save a matplotlib figure atomically, in the format of the extension (.png, .svg, .pdf)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", **savefig)
    return path


def write_records(path: str | os.PathLike, records: Iterable[Any], *, force: bool = False,
                  inputs: Iterable = ()) -> int:
    """Write ``records`` (streamed) to ``path`` atomically, as JSON lines or a JSON array by extension.

    Returns how many were written; see :class:`RecordWriter` for ``force`` and ``inputs``.
    """
    with RecordWriter(path, force=force, inputs=inputs) as w:
        for r in records:
            w.write(r)
    return w.count


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``new`` onto ``target``, replacing it whole: never a mix of both.

    POSIX cannot swap two folders atomically, so the old one is renamed aside first
    (``target`` is missing for an instant, never half-written), then removed.
    """
    new, target = Path(new), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)


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
    """Write records to ``path`` (JSON array or JSONL by extension) atomically, one at a time.

    Use as a context manager (see :func:`atomic_open`).  An existing ``path`` is
    replaced only with ``force``, and never when it is one of ``inputs``.  A JSON
    array is written one record per line, so it stays greppable and diffable.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Iterable = ()):
        self.path = check_output(path, force=force, inputs=inputs)
        self.fmt = record_format(self.path)
        self.count = 0
        self._f: IO[bytes] | None = None
        self._session = self._open()

    @contextlib.contextmanager
    def _open(self) -> Iterator["RecordWriter"]:
        with atomic_open(self.path, "wb") as self._f:
            if self.fmt == "json":
                self._f.write(b"[")
            yield self
            if self.fmt == "json":
                self._f.write(b"\n]\n" if self.count else b"]\n")

    def __enter__(self) -> "RecordWriter":
        return self._session.__enter__()

    def __exit__(self, *exc) -> bool | None:
        return self._session.__exit__(*exc)

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


def _output_error(e: OSError, path: Path) -> OSError | OutputError:
    """A clear error for what the user can act on (disk full, read-only, forbidden); others unchanged."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full writing {path}: free some space (or write elsewhere) and run again")
    if e.errno == errno.EROFS:
        return OutputError(f"read-only file system: cannot write {path}; choose another output path", exit_code=2)
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"permission denied: cannot write {path}; choose another output path", exit_code=2)
    if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
        return OutputError(f"cannot write {path}: the folder {path.parent} does not exist", exit_code=2)
    return e


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _default_permissions() -> int:
    return 0o666 & ~_UMASK


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C, so every clean-up that runs on Ctrl-C (temporary files) runs on it too."""


_terminated = threading.Event()
_owner: int | None = None  # the process that installed the handler (forked children inherit it)


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (by default it kills with no clean-up).

    Only the first one: a second SIGTERM kills at once, should the clean-up itself hang.
    """
    global _owner
    if threading.current_thread() is threading.main_thread():
        _owner = os.getpid()
        _terminated.clear()  # a new run (the CLI called in-process again) starts un-signalled
        signal.signal(signal.SIGTERM, _raise_terminated)
        sys.unraisablehook = _quiet_when_terminated


def terminated() -> bool:
    """Whether SIGTERM arrived. Python swallows an exception raised where it cannot propagate (a finalizer, an
    at-fork hook such as logging's lock release when a worker pool forks), so the raise alone can be lost;
    :func:`atomic_open` checks this before it commits and the CLI before it reports success."""
    return _terminated.is_set()


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpid() != _owner:  # a forked child that has not set its own handler yet: die as by default
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _terminated.set()
    raise Terminated()


def _quiet_when_terminated(unraisable) -> None:
    """A swallowed :class:`Terminated` is not lost (:func:`terminated` carries it): print no traceback for it."""
    if not isinstance(unraisable.exc_value, Terminated):
        sys.__unraisablehook__(unraisable)


# ----------------------------------------------------------------------------- reading


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
# Recovery scans a bad record leniently: the structural characters outside strings, and inside one.
_STRUCTURE = re.compile(r'["{}\[\],]')
_IN_STRING = re.compile(r'["\\]')
# The first key of an object as written, e.g. `{"id":`: how the records of a file begin.
_FIRST_KEY = re.compile(r'\{[ \t\n\r]*"((?:[^"\\]|\\.){1,200})"[ \t\n\r]*:')
# ... and where a damaged record's first key is still readable (`""id":` once its '{' became a quote).
_LEADING_KEY = re.compile(r'[{"\s]{0,8}?"((?:[^"\\]|\\.){1,200})"[ \t\n\r]*:')
_ANY_START = re.compile(r',[ \t\n\r]*(?=\{[ \t\n\r]*"(?:[^"\\]|\\.){1,200}"[ \t\n\r]*:)')
# What follows a ']' that closes a list inside a record: never the array's end.
_AFTER_INNER_CLOSE = ("}", "]", ",")
MAX_SKIP = 16 << 20  # characters a lenient scan of one bad record may hold in memory
CHAIN = 1 << 20  # characters read on after a candidate record start to tell a record from an inner object


class _ArrayReader:
    """Incremental parser of one top-level JSON array.

    We keep a text buffer and let ``json.JSONDecoder.raw_decode`` (C speed) parse
    one element at a time, refilling when an element runs past the buffer end.
    Invalid UTF-8 is decoded with ``surrogateescape`` so one bad byte spoils only
    its record.  A record that does not parse is skipped *alone*: recovery only
    ever lands between two elements of the top-level array (see :meth:`skip_bad`),
    never on an object nested inside the bad record.
    """

    def __init__(self, f, name: str):
        self.f, self.name = f, name
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base = 1  # line number of buf[0]
        self.raw_decode = json.JSONDecoder().raw_decode
        self.first_keys: list[str] = []  # how records begin (`{"id":`), learnt from the file's good records
        self.guessed_keys: list[str] = []  # ... and from bad ones, while no good one is known (may be damaged)
        self.starts: re.Pattern | None = None  # `,` before such a beginning
        self.new_key: str | None = None  # first key of the element just parsed (learnt once it proves top-level)
        self.element_key: str | None = None  # the first key-like text of that element, while no key is known

    def fill(self, want: int = 0) -> bool:
        """Append at least ``want`` more bytes (decoded) to the buffer; False at EOF.

        The buffer is first trimmed to ``self.pos``; while ``self.pos`` is 0 positions stay valid.
        """
        if self.eof:
            return False
        if self.pos:
            self.pin()
        data = self.f.read(max(want, CHUNK))
        if not data:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        self.buf += self.decoder.decode(data)
        return True

    def pin(self) -> None:
        """Drop the buffer before ``self.pos`` (which becomes 0)."""
        self.line_base += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:], 0

    def line_at(self, pos: int) -> int:
        return self.line_base + self.buf.count("\n", 0, pos)

    def skip_ws(self) -> str:
        """Skip whitespace; return the next character ('' at EOF)."""
        c, self.pos = self.peek(self.pos)
        return c

    def peek(self, i: int) -> tuple[str, int]:
        """The first non-whitespace character at or after ``buf[i]`` and its position ('' at EOF)."""
        while True:
            i = _WS.match(self.buf, i).end()
            if i < len(self.buf):
                return self.buf[i], i
            before = self.pos
            more = self.fill()
            i -= before - self.pos  # the buffer was trimmed to self.pos
            if not more and i >= len(self.buf):
                return "", i

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
        n, item = 0, None
        c = self.skip_ws()
        while True:
            if c == "]":
                after = self.peek(self.pos + 1)[0]
                if not after:
                    self.learn(self.new_key)
                    return
                line = self.line_at(self.pos)
                if after in "[{":
                    raise DataError(f"{self.name}: line {line}: more records after the closing ']' of the array; "
                                    "either two arrays were concatenated (use `vicuna data merge`) or the file is "
                                    "corrupt there")
                # a ']' inside a record (recovery landed in one) or junk after the array
                self.skip_bad(self.pos)
                if self.skip_ws() == "" and after not in _AFTER_INNER_CLOSE:
                    log.warning("%s: ignoring data after the closing ']' (line %d)", self.name, line)
                    return
                n += 1
                item = RecordError(n, line, "malformed JSON: a ']' inside a record")
            elif c == "":
                if not isinstance(item, RecordError):  # a bad record that ran into EOF was reported already
                    yield n + 1, RecordError(n + 1, self.line_at(self.pos), "file ends before the closing ']' "
                                             "(truncated?)")
                return
            else:
                n += 1
                self.new_key = None
                item = self.parse_one(n)
                c = self.skip_ws()
                if c not in (",", "]", "") and not isinstance(item, RecordError):
                    if c == "{" and self.record_starts_here():
                        log.warning("%s: line %d: missing ',' before record %d", self.name, self.line_at(self.pos),
                                    n + 1)
                        yield n, item
                        continue
                    # the value was only the start of a malformed record, e.g. `{"id": "a"} "conversations": ...`
                    item = RecordError(n, self.line_at(self.pos), f"malformed JSON: expected ',' or ']' after a "
                                       f"value, found {c!r}")
                    self.skip_bad(self.pos)
            yield n, item
            c = self.skip_ws()
            if c == ",":
                self.learn(self.new_key)
                self.pos += 1
                c = self.skip_ws()
                if c == "]":
                    log.warning("%s: line %d: a ',' before the closing ']'", self.name, self.line_at(self.pos))

    def parse_one(self, n: int) -> Any:
        """Parse the element at ``self.pos``; a malformed one comes back as a :class:`RecordError`."""
        while True:
            start = self.pos
            if not self.first_keys:  # until a record is read: its first key, from the text, in case it is bad
                m = _LEADING_KEY.match(self.buf, start)
                self.element_key = m and m.group(1)
            try:
                obj, end = self.raw_decode(self.buf, start)
            except json.JSONDecodeError as e:
                err = RecordError(n, self.line_at(e.pos), f"malformed JSON: {e.msg}")
                if _maybe_truncated(e, self.buf) and self.fill(len(self.buf) - self.pos):
                    continue  # the record runs past the buffer: read more (doubling) and retry
                self.skip_bad(self.pos)  # (not `start`: fill() trimmed the buffer to the element's start)
                return err
            except RecursionError:
                err = RecordError(n, self.line_at(start), "malformed JSON: nested too deeply")
                self.skip_bad(start)
                return err
            if end >= len(self.buf) and not self.eof and not isinstance(obj, (dict, list, str)):
                # a bare number at the buffer end may continue in the next chunk
                if self.fill():
                    continue
            self.pos = end
            if _BAD_BYTES.search(self.buf, start, end):
                return RecordError(n, self.line_at(start), "invalid UTF-8 in the record")
            if isinstance(obj, dict) and len(self.first_keys) < 8:
                m = _FIRST_KEY.match(self.buf, start)
                self.new_key = m and m.group(1)
            return obj

    def learn(self, key: str | None, guessed: bool = False) -> None:
        """Remember that records of this file begin with ``{"KEY":``, to find them after a bad record."""
        known = self.guessed_keys if guessed else self.first_keys
        if key and key not in known:
            known.append(key)
            keys = "|".join(map(re.escape, self.first_keys + self.guessed_keys))
            self.starts = re.compile(r',[ \t\n\r]*(?=\{[ \t\n\r]*"(?:' + keys + r')"[ \t\n\r]*:)')

    # -------------------------------------------------------------- recovery

    def skip_bad(self, start: int) -> None:
        """Move to the ',' or ']' that ends the bad record at ``buf[start]`` (or to EOF).

        Two views, so that one damaged record never takes good ones with it: a
        lenient scan of the record's brackets and strings (exact unless the damage
        is to a quote, bracket or escape), and the places where a record begins
        (`, {"id":` ...) that parses and goes on as an element of the top-level array
        (:meth:`is_record_start`).  A record start before the scan's end wins (the
        scan went too far); a scan end that no element can follow means the scan
        stopped inside the bad record (a damaged quote turns strings inside out), and
        we read on to the next record start.
        """
        self.pos = start
        self.pin()
        self.new_key = None
        if not self.first_keys:
            self.learn(self.element_key, guessed=True)  # the bad record's own first key, if it still has one
        end = self.lenient_end(0)
        hi = end if end is not None else len(self.buf)
        hit = self.find_start(self.starts, 1, hi)
        if hit is None:  # any object, if it proves to be top-level: the scan is exact unless quotes were hit
            hit = self.find_start(_ANY_START, 1, hi, proven=True)
        if hit is not None:
            self.pos = hit
        elif end is not None and (self.buf[end] == "]" or self.plausible_element(end + 1)):
            self.pos = end
        else:
            self.slide_to_start(1)

    def lenient_end(self, i: int, stray: bool = True) -> int | None:
        """Where the value at ``buf[i]`` ends, counting brackets outside strings (None: EOF or too long).

        Anything inside a string is accepted (the usual damage: control characters, bad
        escapes); with ``stray``, a closer with nothing open is skipped, except the array's
        own ']' at the end of the file.
        """
        depth, in_string = 0, False
        while True:
            m = (_IN_STRING if in_string else _STRUCTURE).search(self.buf, i)
            if m is None:
                i = max(i, len(self.buf))
                if len(self.buf) > MAX_SKIP or (not self.fill() and i >= len(self.buf)):
                    return None
                continue
            j, ch = m.start(), m.group()
            i = j + 1
            if in_string:
                if ch == "\\":
                    i = j + 2
                else:
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif depth:
                depth -= ch != ","
            elif ch == "," or (ch == "]" and (not stray or not self.peek(j + 1)[0])):
                return j

    def find_start(self, starts: re.Pattern | None, lo: int, hi: int, proven: bool = False) -> int | None:
        """The first ',' in ``buf[lo:hi]`` that ``starts`` matches and a plausible top-level record follows."""
        while starts is not None:
            m = starts.search(self.buf, lo, min(len(self.buf), hi + 256))
            if m is None or m.start() >= hi:
                return None
            if self.is_record_start(m.end(), proven):
                return m.start()
            lo = m.start() + 1
        return None

    def is_record_start(self, i: int, proven: bool = False) -> bool:
        """Does an element of the top-level array begin at ``buf[i]``?

        It must be an object followed by ',' or ']'.  An object inside the bad record
        shows itself soon after: its list closes into its parent (a ']' that is not the
        end of the file), or a ':' or '}' shows that it sits in an object.  So we read on,
        element by element, up to ``CHAIN`` characters.  That evidence may also come
        from damage to the next record, so an object that begins as this file's records
        do (`{"id":`) is trusted anyway, and so is any object while no good record is known
        yet; a start that must be ``proven`` (one inside the bad record's own scan) needs
        no record shape known at all, or no evidence against it up to the end of the file,
        or ``CHAIN`` characters without reading over damage.
        """
        value = self.decode_at(i)
        if value is None or not isinstance(value[0], dict):
            return False
        m = _FIRST_KEY.match(self.buf, i)
        known = bool(m and m.group(1) in self.first_keys + self.guessed_keys)
        # with no record shape known, nothing tells an inner object from a record: trust it
        shapeless = not (self.first_keys + self.guessed_keys if proven else self.first_keys)
        first, end, skipped = i, value[1], False
        while end - first < CHAIN:
            c, j = self.peek(end)
            if c == "]" and not self.peek(j + 1)[0]:
                return True  # the end of the file: the top-level array closed
            if c in "]:}":  # a list closing into its parent, a key, an object's end: inside a record
                return known or (skipped and shapeless)
            if c == ",":
                i = self.peek(j + 1)[1]
                value = self.decode_at(i)
                if value is not None:
                    end = value[1]
                    continue
            else:
                i = j
            end, skipped = self.lenient_end(i, stray=False), True  # read over a bad element
            if end is None:
                return True  # to the end of the file, and nothing showed it is inside a record
        return known or not skipped or shapeless

    def plausible_element(self, i: int) -> bool:
        """Can the next element be one of the top-level array? (A bad one can: it is reported on its own.)

        A value followed by something other than ',' or ']', or an object of a list
        inside a record, shows that the scan ended inside the bad record instead.
        """
        i = self.peek(i)[1]
        value = self.decode_at(i)
        if value is None:
            return True
        if isinstance(value[0], dict):
            return self.is_record_start(i)
        return self.peek(value[1])[0] in (",", "]")

    def decode_at(self, i: int) -> tuple[Any, int] | None:
        while True:
            try:
                return self.raw_decode(self.buf, i)
            except json.JSONDecodeError as e:
                if _maybe_truncated(e, self.buf) and len(self.buf) < MAX_SKIP and self.fill(len(self.buf)):
                    continue
                return None
            except RecursionError:
                return None

    def slide_to_start(self, lo: int) -> None:
        """Read on (in bounded memory) to the next record start; EOF if there is none.

        A record beginning as the file's records do is preferred; failing that, any object
        that continues as an element of the top-level array.
        """
        while True:
            hit = self.find_start(self.starts, lo, len(self.buf))
            if hit is None:
                hit = self.find_start(_ANY_START, lo, len(self.buf))
            if hit is not None:
                self.pos = hit
                return
            if self.eof:
                self.pos = len(self.buf)
                return
            self.pos = max(lo, len(self.buf) - 256)  # a start may straddle the chunk boundary
            self.pin()
            lo = 0
            self.fill()

    def record_starts_here(self) -> bool:
        """Does a record like the one before begin at ``self.pos`` (with the ',' between them missing)?"""
        self.pin()
        m = _FIRST_KEY.match(self.buf, 0)
        return bool(m and m.group(1) in (*self.first_keys, self.new_key) and self.is_record_start(0))


def _maybe_truncated(e: json.JSONDecodeError, buf: str) -> bool:
    """Could this error go away with more input? (Errors from the buffer end, or an open string.)"""
    return e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")


def _read_json_array(f, name: str) -> Iterator[tuple[int, Any]]:
    yield from _ArrayReader(f, name)


# ----------------------------------------------------------------------------- progress


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "rec"):
    """A tqdm progress bar on stderr, silent when stderr is not a terminal.

    With no ``iterable``, call ``update()`` on the bar yourself.
    """
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True, mininterval=0.5)
