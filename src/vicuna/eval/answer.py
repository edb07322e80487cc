"""`eval answer`: ask a model every question, turn by turn, resumably and in parallel."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import EvalUsageError
from ..files import write_records
from .openai_client import CompletionFailed, Endpoint, chat
from .records import AppendLog, OutputLock, Question, answer_turns, interrupt_note, prepare_output, read_log, run_parallel

log = logging.getLogger(__name__)

# Sampling temperature per category: creative work warmer, checkable work greedy.
# Covers the MT-bench and original Vicuna-80 category names; override with --temperature.
DEFAULT_TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "counterfactual": 0.7, "generic": 0.7,
    "stem": 0.1, "humanities": 0.1, "knowledge": 0.1,
    "common-sense": 0.3, "fermi": 0.3,
    "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
}
DEFAULT_TEMPERATURE = 0.7


def parse_temperatures(specs: list[str] | None) -> dict[str, float]:
    """``["writing=0.9", "math=0"]`` -> overrides; ``default=T`` sets other categories."""
    out: dict[str, float] = {}
    for spec in specs or []:
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            try:
                t = float(value)
            except ValueError:
                t = -1.0
            if not sep or not name.strip() or not 0 <= t <= 2:
                raise EvalUsageError(f"bad --temperature {part!r}: use CATEGORY=T with 0 <= T <= 2, e.g. writing=0.9")
            out[name.strip()] = t
    return out


@dataclass
class AnswerSettings:
    temperatures: dict[str, float] = field(default_factory=dict)
    max_tokens: int = 1024
    system: str | None = None

    def temperature(self, category: str) -> float:
        for table in (self.temperatures, DEFAULT_TEMPERATURES):
            if category in table:
                return table[category]
        return self.temperatures.get("default", DEFAULT_TEMPERATURE)


def answer_question(endpoint: Endpoint, q: Question, settings: AnswerSettings, client=None) -> dict:
    """Answer all turns, feeding earlier answers back; a failure is recorded, not raised."""
    temperature = settings.temperature(q.category)
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    turns: list[str] = []
    status, error, attempts = "ok", None, 0
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for user in q.turns:
        messages.append({"role": "user", "content": user})
        try:
            reply = chat(endpoint, messages, temperature=temperature, max_tokens=settings.max_tokens, client=client)
        except CompletionFailed as e:
            status, error, attempts = "error", f"turn {len(turns) + 1}: {e}", attempts + e.attempts
            break
        attempts += reply.attempts
        usage = _add_usage(usage, reply.usage)
        turns.append(reply.text)
        messages.append({"role": "assistant", "content": reply.text})
    return {
        "question_id": q.question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": None,  # filled by the caller
        "category": q.category,
        "choices": [{"index": 0, "turns": turns}],
        "status": status,
        "error": error,
        "attempts": attempts,
        "usage": usage,
        "generation": {"api_model": endpoint.model, "temperature": temperature, "max_tokens": settings.max_tokens},
        "tstamp": time.time(),
    }


def _add_usage(total: dict | None, more: dict | None) -> dict | None:
    """Token counts summed over turns; unknown (None) as soon as one turn's are unknown."""
    if total is None or more is None:
        return None
    return {k: total[k] + more[k] for k in total}


def run_answers(
    questions: list[Question],
    endpoint: Endpoint,
    output: Path,
    *,
    model_id: str,
    settings: AnswerSettings,
    parallel: int = 1,
    force: bool = False,
) -> dict[str, int]:
    """Answer the questions not answered yet in ``output``; returns counts."""
    output = Path(output)
    with OutputLock(output):
        return _run_answers(questions, endpoint, output, model_id=model_id, settings=settings, parallel=parallel,
                            force=force)


def _run_answers(questions: list[Question], endpoint: Endpoint, output: Path, *, model_id: str,
                 settings: AnswerSettings, parallel: int, force: bool) -> dict[str, int]:
    prepare_output(output, force)
    done = {}
    for rec in read_log(output):
        if rec.get("model_id") not in (None, model_id):
            raise EvalUsageError(f"{output} holds answers of model {rec.get('model_id')!r}, not {model_id!r}; "
                                 "use another -o or --force")
        if answer_turns(rec) is not None and "question_id" in rec:
            done[rec["question_id"]] = rec
    todo = [q for q in questions if q.question_id not in done]
    if done:
        log.info("%s: %d of %d questions already answered; answering %d", output, len(questions) - len(todo),
                 len(questions), len(todo))
    client = endpoint.client()
    errors = 0
    calls = [functools.partial(answer_question, endpoint, q, settings, client) for q in todo]
    with AppendLog(output) as out, interrupt_note(output, out):
        for rec in run_parallel(calls, parallel, f"answer {model_id}", "q"):
            rec["model_id"] = model_id
            out.append(rec)
            if rec["status"] == "ok":
                done[rec["question_id"]] = rec
            else:
                errors += 1
                log.warning("question %s failed: %s", rec["question_id"], rec["error"])
    _compact(output, questions, model_id)
    return {"questions": len(questions), "answered": len(todo) - errors, "skipped": len(questions) - len(todo),
            "errors": errors}


def _compact(output: Path, questions: list[Question], model_id: str) -> None:
    """Rewrite the log: one record per question (a success beats an error), in question order."""
    best: dict = {}
    for rec in read_log(output):
        qid = rec.get("question_id")
        if qid not in best or rec.get("status") == "ok" or best[qid].get("status") != "ok":
            best[qid] = rec
    order = {q.question_id: i for i, q in enumerate(questions)}
    records = sorted(best.values(), key=lambda r: (order.get(r.get("question_id"), len(order)), str(r.get("question_id"))))
    write_records(output, records, force=True)
