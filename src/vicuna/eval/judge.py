"""`eval judge`: LLM-as-a-judge over answers, pairwise (both orders) or single-answer.

One judgment record per judge call. A pairwise comparison is judged twice, once with each
model in position 1, and the report combines the two (position-bias control); records keep
everything needed to audit or re-parse a verdict without asking the judge again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import EvalUsageError
from ..files import write_records
from .client import CompletionFailed, Endpoint, chat
from .io import AppendLog, Question, find_answer_file, load_answers, prepare_output, read_log, run_parallel
from .parse import MODES, OK, parse_judgment

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = "vicuna-judge-v1"
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
FINAL = ("ok", "unparsed")  # statuses that a resumed run does not redo; "error" is retried


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSet:
    """Judge prompts loaded from a YAML data file; ``version`` is recorded in every judgment."""

    name: str
    version: str  # e.g. "vicuna-judge-v1"
    sha: str  # first 12 hex digits of the file's sha256: catches unversioned edits
    prompts: dict
    reference_block: str
    history_block: str

    def render(self, mode: str, *, question: str, answers: list[str], histories: list[list[tuple[str, str]]],
               reference: str | None) -> list[dict]:
        p = self.prompts[mode]
        who = ["Assistant A", "Assistant B"] if mode == "pairwise" else ["Assistant 1", "Assistant 2"]
        if mode == "single":
            who = ["the Assistant"]
        hist = [self._history(h, w) for h, w in zip(histories, who)]
        fields = {
            "question": question,
            "reference_block": self.reference_block.format(reference=reference) + "\n" if reference else "",
        }
        if mode == "single":
            fields.update(answer=answers[0], history=hist[0])
        else:
            fields.update(answer_1=answers[0], answer_2=answers[1], history_1=hist[0], history_2=hist[1])
        return [{"role": "system", "content": p["system"].strip()},
                {"role": "user", "content": p["user"].format(**fields).strip()}]

    def _history(self, turns: list[tuple[str, str]], who: str) -> str:
        if not turns:
            return ""
        text = "\n\n".join(f"User: {q}\n\n{who}: {a}" for q, a in turns)
        return self.history_block.format(who=who, history=text) + "\n"


def list_prompt_sets() -> list[str]:
    folder = resources.files("vicuna.eval") / "prompts"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def load_prompts(name_or_path: str = DEFAULT_PROMPTS) -> PromptSet:
    """A bundled prompt set by name (``vicuna eval prompts`` lists them) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        bundled = resources.files("vicuna.eval") / "prompts" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise EvalUsageError(f"unknown judge prompt set {name_or_path!r}; bundled: {', '.join(list_prompt_sets())} "
                                 "(or give the path of a YAML file)")
        raw = bundled.read_bytes()
        where = f"bundled prompt set {name_or_path}"
    else:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise EvalUsageError(f"cannot read judge prompts {path}: {e.strerror or e}") from None
        where = str(path)
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise EvalUsageError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), dict):
        raise EvalUsageError(f"{where}: expected a mapping with name, version and prompts")
    for key in ("name", "version"):
        if key not in data:
            raise EvalUsageError(f"{where}: missing {key!r}")
    for mode in MODES:
        p = data["prompts"].get(mode)
        if not isinstance(p, dict) or not isinstance(p.get("system"), str) or not isinstance(p.get("user"), str):
            raise EvalUsageError(f"{where}: prompts.{mode} needs 'system' and 'user' strings")
    ps = PromptSet(
        name=str(data["name"]), version=f"{data['name']}-v{data['version']}", sha=hashlib.sha256(raw).hexdigest()[:12],
        prompts=data["prompts"], reference_block=str(data.get("reference_block", "[Reference Answer]\n{reference}\n")),
        history_block=str(data.get("history_block", "{history}\n")),
    )
    # Fail now, naming the template, rather than in a worker thread halfway through a run.
    for mode in MODES:
        try:
            ps.render(mode, question="q", answers=["a", "b"], histories=[[("q0", "a0")], [("q0", "b0")]], reference="r")
        except (KeyError, IndexError, ValueError) as e:
            raise EvalUsageError(f"{where}: prompts.{mode} (or a block it uses) has a bad placeholder {e}; "
                                 "allowed: {question} {answer} {answer_1} {answer_2} {history} {history_1} "
                                 "{history_2} {reference_block} {reference} {who}; write literal braces as {{ }}") from None
    return ps


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    question: Question
    turn: int  # 1-based
    model_a: str  # the canonical pair (model_b is the baseline when there is one)
    model_b: str | None
    order: str | None  # "AB": model_a shown first; "BA": swapped; None in single mode
    reference: str | None

    @property
    def positions(self) -> list[str]:
        if self.model_b is None:
            return [self.model_a]
        return [self.model_a, self.model_b] if self.order == "AB" else [self.model_b, self.model_a]

    def key(self, mode: str) -> str:
        pair = self.model_a if self.model_b is None else f"{self.model_a}|{self.model_b}|{self.order}"
        return f"{mode}|{self.question.question_id}|{self.turn}|{pair}"


def model_pairs(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    if baseline:
        return [(m, baseline) for m in models if m != baseline]
    return list(itertools.combinations(models, 2))


def build_jobs(questions: list[Question], answers: dict[str, dict], mode: str, *, baseline: str | None,
               swap: bool, references: dict, reference_categories) -> tuple[list[Job], int]:
    """All judge calls to make, and how many were impossible for lack of an answer."""
    models = list(answers)
    units = [(m, None) for m in models] if mode == "single" else model_pairs(models, baseline)
    orders = [None] if mode == "single" else (["AB", "BA"] if swap else ["AB"])
    jobs, missing = [], 0
    for q in questions:
        ref_turns = references.get(q.question_id) or q.reference
        for turn in range(1, len(q.turns) + 1):
            ref = None
            if ref_turns and q.category in reference_categories and len(ref_turns) >= turn:
                ref = ref_turns[turn - 1].strip() or None  # MT-bench has "" for some second turns
            for a, b in units:
                if any(len(answers[m].get(q.question_id) or []) < turn for m in (a, b) if m):
                    missing += len(orders)
                    continue
                jobs.extend(Job(q, turn, a, b, o, ref) for o in orders)
    return jobs, missing


def _histories(job: Job, answers: dict[str, dict]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    q, t = job.question, job.turn
    current = [answers[m][q.question_id][t - 1] for m in job.positions]
    hist = [list(zip(q.turns[: t - 1], answers[m][q.question_id][: t - 1])) for m in job.positions]
    return current, hist


def to_canonical(mode: str, job: Job, parsed: dict) -> dict | None:
    """Positional parse result -> result in terms of model_a / model_b."""
    if parsed.get("status") != OK:
        return None
    if mode == "single":
        return {"score": parsed["score"]}
    first_is_a = job.order == "AB"
    if mode == "pairwise-score":
        s1, s2 = parsed["scores"]
        sa, sb = (s1, s2) if first_is_a else (s2, s1)
        return {"score_a": sa, "score_b": sb, "winner": "model_a" if sa > sb else "model_b" if sb > sa else "tie"}
    v = parsed["verdict"]
    if v == "tie":
        return {"winner": "tie"}
    shown_first = v == "A"
    return {"winner": "model_a" if shown_first == first_is_a else "model_b"}


def judge_one(job: Job, mode: str, answers: dict, prompts: PromptSet, endpoint: Endpoint, *, client=None,
              max_tokens: int = 2048, baseline: str | None = None) -> dict:
    current, hist = _histories(job, answers)
    messages = prompts.render(mode, question=job.question.turns[job.turn - 1], answers=current, histories=hist,
                              reference=job.reference)
    rec: dict[str, Any] = {
        "judgment_id": job.key(mode),
        "question_id": job.question.question_id,
        "category": job.question.category,
        "turn": job.turn,
        "mode": mode,
        "model_a": job.model_a,
        "model_b": job.model_b,
        "order": job.order,
        "positions": job.positions,
        "baseline": baseline,
        "judge_model": endpoint.model,
        "prompt_version": prompts.version,
        "prompt_sha": prompts.sha,
        "reference_guided": job.reference is not None,
    }
    try:
        text, attempts = chat(endpoint, messages, temperature=0.0, max_tokens=max_tokens, client=client)
    except CompletionFailed as e:
        return {**rec, "status": "error", "error": str(e), "attempts": e.attempts, "raw": None, "parsed": None,
                "result": None, "tstamp": time.time()}
    parsed = parse_judgment(mode, text)
    return {**rec, "status": parsed["status"], "error": None, "attempts": attempts, "raw": text, "parsed": parsed,
            "result": to_canonical(mode, job, parsed), "tstamp": time.time()}


# ---------------------------------------------------------------- the command


def run_judge(
    questions: list[Question],
    answers_dir: Path,
    models: list[str],
    endpoint: Endpoint,
    output: Path,
    *,
    mode: str,
    baseline: str | None = None,
    references: dict | None = None,
    reference_categories=REFERENCE_CATEGORIES,
    swap: bool = True,
    prompts: PromptSet | None = None,
    parallel: int = 1,
    force: bool = False,
    max_tokens: int = 2048,
) -> dict[str, int]:
    """Judge what is not judged yet in ``output``; returns counts."""
    if mode not in MODES:
        raise EvalUsageError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if len(set(models)) != len(models) or not models:
        raise EvalUsageError("--models must name one or more distinct models")
    if mode != "single" and len(models) < 2:
        raise EvalUsageError(f"--mode {mode} compares models: give at least two in --models")
    if baseline and baseline not in models:
        raise EvalUsageError(f"--baseline {baseline!r} must be one of --models ({', '.join(models)})")
    prompts = prompts or load_prompts()
    output = Path(output)
    answers = {m: load_answers(find_answer_file(Path(answers_dir), m)) for m in models}
    jobs, missing = build_jobs(questions, answers, mode, baseline=baseline, swap=swap, references=references or {},
                               reference_categories=set(reference_categories))
    if not jobs:
        raise EvalUsageError(f"nothing to judge: no question in the question file has answers from "
                             f"{'every model' if mode == 'single' else 'both models of a pair'} in {answers_dir} "
                             "(do --questions and the answer files match? compare their question_id values)")
    if missing:
        log.warning("%d judgments skipped: an answer is missing or failed (see the answer files' 'status')", missing)

    prepare_output(output, force)
    done: dict[str, dict] = {}
    for rec in read_log(output):
        for field, want in (("judge_model", endpoint.model), ("prompt_version", prompts.version), ("mode", mode)):
            if rec.get(field) != want:
                raise EvalUsageError(f"{output} holds judgments with {field}={rec.get(field)!r}, not {want!r}; "
                                     "use another -o or --force to start over")
        if rec.get("status") in FINAL:
            done[rec["judgment_id"]] = rec
    todo = [j for j in jobs if j.key(mode) not in done]
    if done:
        log.info("%s: %d judgments already done; %d to go", output, len(jobs) - len(todo), len(todo))

    client = endpoint.client()
    counts = {"ok": 0, "unparsed": 0, "error": 0}
    calls = [functools.partial(judge_one, j, mode, answers, prompts, endpoint, client=client, max_tokens=max_tokens,
                               baseline=baseline) for j in todo]
    with AppendLog(output) as out:
        for rec in run_parallel(calls, parallel, "judge", "call"):
            out.append(rec)
            counts[rec["status"]] += 1
            if rec["status"] == "error":
                log.warning("judgment %s failed: %s", rec["judgment_id"], rec["error"])
            elif rec["status"] == "unparsed":
                log.warning("judgment %s unparsed: %s", rec["judgment_id"], rec["parsed"].get("reason"))
    _compact(output, [j.key(mode) for j in jobs])
    return {"jobs": len(jobs), "skipped_done": len(jobs) - len(todo), "missing_answers": missing, **counts}


def _compact(output: Path, order: list[str]) -> None:
    """One record per judgment (a final status beats an error; later beats earlier), in job order."""
    best: dict[str, dict] = {}
    for rec in read_log(output):
        k = rec.get("judgment_id")
        if k not in best or rec.get("status") in FINAL or best[k].get("status") not in FINAL:
            best[k] = rec
    rank = {k: i for i, k in enumerate(order)}
    ordered = sorted(best.values(), key=lambda r: rank.get(r.get("judgment_id"), len(rank)))
    write_records(output, ordered, force=True)
