"""Files of the evaluation: questions, answers, references, judgment logs.

Outputs are append-only JSONL logs while a job runs (a killed run leaves a valid prefix,
so the next run resumes from it) and are rewritten atomically, deduplicated and in
question order, when the job finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError, EvalUsageError
from ..files import RecordError, progress
from ..files import read_records as stream_records

log = logging.getLogger(__name__)

BUILTIN_QUESTIONS = "builtin"


# ---------------------------------------------------------------- generic JSON / JSONL


def read_records(path: Path) -> list[dict]:
    """The objects of a .jsonl file (one per line) or a .json file (a list); any bad record is an error."""
    records = []
    try:
        for n, rec in stream_records(path):
            if isinstance(rec, RecordError):
                raise EvalUsageError(f"{path}: {rec}; fix or remove it")
            if not isinstance(rec, dict):
                raise EvalUsageError(f"{path}: record {n}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    except DataError as e:
        raise EvalUsageError(str(e)) from None
    return records


class AppendLog:
    """An append-only JSONL file: each finished record is flushed at once (resumability)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A torn last line from a killed run would glue onto the next record: end it first.
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n")
        self._f = open(self.path, "a", encoding="utf-8")
        self.count = 0  # records appended by this run

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def interrupt_note(output: Path, log_file: AppendLog):
    """On Ctrl+C, say what was kept and how to go on (the CLI then exits 130)."""
    try:
        yield
    except KeyboardInterrupt:
        log.warning("interrupted: the %d records finished in this run are saved in %s; run the same command "
                    "again to resume", log_file.count, output)
        raise


def prepare_output(path: Path, force: bool) -> None:
    """``--force`` starts over; otherwise an existing output is resumed."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise EvalUsageError(f"output {path} must end in .jsonl")
    if path.suffix == ".json":
        raise EvalUsageError(f"output {path}: use .jsonl (records are appended as they finish, for resuming)")
    if force and path.exists():
        path.unlink()


def read_log(path: Path) -> list[dict]:
    """Records of an append log (missing file -> none; torn tail tolerated)."""
    if not Path(path).exists():
        return []
    # Lines in the middle that are torn (an old crash, then a resume) are skipped too.
    out = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a torn line (an interrupted run?)", path, line_no)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# ---------------------------------------------------------------- questions


@dataclass
class Question:
    question_id: Any
    category: str
    turns: list[str]
    reference: list[str] | None = None
    extra: dict = field(default_factory=dict)


def builtin_questions_path() -> Path:
    return Path(str(resources.files("vicuna.eval") / "questions" / "default.jsonl"))


def load_questions(path: str | Path | None) -> list[Question]:
    """MT-bench form ``{question_id, category, turns, reference?}``, old ``{question_id, text, category}``,
    or Arena-Hard's: ``uid`` for the id, ``turns`` as ``[{"content": ...}]`` or one ``prompt``."""
    if path is None or str(path) == BUILTIN_QUESTIONS:
        path = builtin_questions_path()
    path = Path(path)
    questions: list[Question] = []
    seen: set = set()
    for n, rec in enumerate(read_records(path), 1):
        where = f"{path}: question {n}"
        qid = rec.get("question_id", rec.get("uid"))
        if qid is None:
            raise EvalUsageError(f"{where}: missing 'question_id' (or Arena-Hard's 'uid')")
        where = f"{path}: question {qid!r}"
        if qid in seen:
            raise EvalUsageError(f"{where}: duplicate question_id")
        seen.add(qid)
        if "turns" in rec:
            turns = _contents(rec["turns"])
        elif "text" in rec:
            turns = [rec["text"]]
        elif "prompt" in rec:
            turns = [rec["prompt"]]
        else:
            raise EvalUsageError(f"{where}: needs 'turns' (a list of user messages), 'text' or 'prompt'")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise EvalUsageError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        ref = rec.get("reference")
        if isinstance(ref, str):
            ref = [ref]
        if ref is not None and not (isinstance(ref, list) and all(isinstance(r, str) for r in ref)):
            raise EvalUsageError(f"{where}: 'reference' must be a list of strings (one per turn)")
        extra = {k: v for k, v in rec.items()
                 if k not in ("question_id", "uid", "category", "turns", "text", "prompt", "reference")}
        questions.append(Question(qid, str(rec.get("category") or "general"), turns, ref or None, extra))
    if not questions:
        raise EvalUsageError(f"{path}: no questions")
    return questions


# ---------------------------------------------------------------- answers


def _contents(turns: Any) -> Any:
    """Arena-Hard writes turns as ``{"content": ...}`` (answers: ``{"content", "token_len"}``)."""
    if isinstance(turns, list):
        return [t["content"] if isinstance(t, dict) and "content" in t else t for t in turns]
    return turns


def answer_turns(rec: dict) -> list[str] | None:
    """The answer turns of an answer record (MT-bench / Arena-Hard ``choices``, Arena-Hard v2
    ``messages``, blog ``text``)."""
    if rec.get("status", "ok") != "ok":
        return None
    if "choices" in rec:
        try:
            turns = _contents(rec["choices"][0]["turns"])
        except (LookupError, TypeError):
            return None
    elif isinstance(rec.get("messages"), list):
        turns = [m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        turns = [t.get("answer") if isinstance(t, dict) else t for t in turns]
    elif "text" in rec:
        turns = [rec["text"]]
    elif "turns" in rec:
        turns = rec["turns"]
    else:
        return None
    return turns if isinstance(turns, list) and all(isinstance(t, str) for t in turns) else None


def find_answer_file(answers_dir: Path, model: str) -> Path:
    """``DIR/MODEL.jsonl`` (what ``eval answer`` writes) or ``DIR/answer_MODEL.jsonl`` (older tables)."""
    for name in (f"{model}.jsonl", f"answer_{model}.jsonl", f"{model}.json"):
        p = Path(answers_dir) / name
        if p.exists():
            return p
    raise EvalUsageError(f"no answers for model {model!r} in {answers_dir}: expected {model}.jsonl "
                         f"(run `vicuna eval answer --model-id {model} -o {Path(answers_dir) / (model + '.jsonl')}`)")


def load_answers(path: Path) -> dict[Any, list[str]]:
    """question_id -> answer turns; failed answers are left out (their judgments are skipped)."""
    out: dict[Any, list[str]] = {}
    for rec in read_records(path):
        turns = answer_turns(rec)
        qid = rec.get("question_id", rec.get("uid"))
        if turns is not None and qid is not None:
            out[qid] = turns
    return out


def load_references(path: Path) -> dict[Any, list[str]]:
    """question_id -> reference turns, from an answer file (``choices``) or question file (``reference``)."""
    out: dict[Any, list[str]] = {}
    for rec in read_records(path):
        if "question_id" not in rec:
            continue
        ref = rec.get("reference")
        turns = ([ref] if isinstance(ref, str) else ref) if ref is not None else answer_turns(rec)
        if turns:
            out[rec["question_id"]] = turns
    return out


def run_parallel(calls: list[Callable[[], Any]], parallel: int, desc: str, unit: str) -> Iterator[Any]:
    """Run ``calls`` on ``parallel`` threads; yield each result as it finishes, with a progress bar.

    Why not ``ThreadPoolExecutor``: its workers are joined at interpreter exit, so a Ctrl+C
    would wait for every call in flight -- against a hung endpoint, its timeout times its
    retries. Here the workers are daemon threads: an interrupt (or the consumer stopping)
    stops handing out calls, abandons the ones in flight (their client timeouts end them,
    or the process exit does), and every result already yielded is the consumer's to keep.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for call in calls:
        todo.put(call)
    finished: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                call = todo.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((True, call()))
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer, re-raised there
                finished.put((False, e))

    for i in range(min(max(1, parallel), len(calls))):
        threading.Thread(target=work, name=f"{desc}-{i}", daemon=True).start()
    bar = progress(total=len(calls), desc=desc, unit=unit)
    try:
        for _ in calls:
            ok, value = finished.get()  # interruptible: Ctrl+C lands here at once
            if not ok:
                raise value
            yield value
            bar.update()
    finally:
        stop.set()
        bar.close()


class OutputLock:
    """An advisory lock on an output file, held while a run writes it.

    Two runs on one output would make every (paid) judge call twice and interleave their
    records. The lock is a ``flock`` on a hidden file beside the output (the output itself
    is replaced by renames, so its inode cannot carry the lock); the kernel drops it when the
    process dies, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = self.output.with_name(f".{self.output.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise EvalUsageError(f"{self.output} is being written by another run (pid {holder}); wait for it to "
                                     "finish, or write to another -o") from None
            try:  # the previous holder may have removed the file between our open and our lock
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
