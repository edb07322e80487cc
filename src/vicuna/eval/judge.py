"""`eval judge`: LLM-as-a-judge over answers, pairwise (both orders) or single-answer.

One judgment record per judge call. A pairwise comparison is judged twice, once with each
model in position 1, and the report combines the two (position-bias control); records keep
everything needed to audit or re-parse a verdict without asking the judge again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EvalUsageError
from ..files import write_records
from .openai_client import CompletionFailed, Endpoint, chat
from .records import (
    AppendLog, OutputLock, Question, find_answer_file, interrupt_note, load_answers, prepare_output, read_log,
    run_parallel,
)
from .judge_prompts import (
    DEFAULT_PROMPTS, PROTOCOLS, REFERENCE_CATEGORIES, JudgePrompt, MissingReference, load_arena_hard_prompts,
    load_judge_prompts, load_prompts,
)
from ..ratings import style_of
from .parse import MODES, OK, parse_judgment

log = logging.getLogger(__name__)

FINAL = ("ok", "unparsed")  # statuses that a resumed run does not redo; "error" is retried


# ---------------------------------------------------------------- protocols


@dataclass(frozen=True)
class JudgeSetup:
    """What a judge run does: mode, prompt book, position swap, and the protocol it follows."""

    mode: str
    book: Any  # PromptSet | MTBenchBook | BlogBook
    swap: bool
    protocol: str | None = None


def resolve_setup(*, protocol: str | None = None, mode: str | None = None, judge_prompts: Path | None = None,
                  judge_reviewers: Path | None = None, prompts: str | None = None,
                  swap: bool | None = None) -> JudgeSetup:
    """Options of `eval judge` / `eval run` -> a consistent setup, or a usage error that says why."""
    if prompts and judge_prompts:
        raise EvalUsageError("give either --prompts (our YAML prompt sets) or --judge-prompts (a FastChat file), not both")
    if judge_reviewers and not judge_prompts:
        raise EvalUsageError("--judge-reviewers goes with --judge-prompts (the Vicuna-blog prompt.jsonl)")
    arena_hard = protocol == "arena-hard" or (protocol is None and mode == "pairwise-5")
    if arena_hard and prompts:
        raise EvalUsageError("--prompts names our pairwise/single prompt sets; five-level (arena-hard) judging takes "
                             "an Arena-Hard judge_config.yaml in --judge-prompts, or none (ours is bundled)")
    if judge_prompts:
        book = load_judge_prompts(judge_prompts, judge_reviewers)
    elif arena_hard:
        book = load_arena_hard_prompts()
    else:
        book = load_prompts(prompts or DEFAULT_PROMPTS)
    if protocol is None:
        mode = mode or book.modes[0]  # ours: pairwise-score; MT-bench: single (FastChat's default)
        if mode not in book.modes:
            raise EvalUsageError(f"{judge_prompts} holds no prompts for --mode {mode}; it has: {', '.join(book.modes)}")
        return JudgeSetup(mode, book, True if swap is None else swap)
    if protocol not in PROTOCOLS:
        raise EvalUsageError(f"unknown --protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    if book.kind != p.prompts:
        what = {"mt-bench": "FastChat's MT-bench judge_prompts.jsonl",
                "vicuna-blog": "the Vicuna blog's prompt.jsonl (and --judge-reviewers reviewer.jsonl)",
                "arena-hard": "an Arena-Hard judge_config.yaml (system_prompt, prompt_template), or no "
                              "--judge-prompts for the bundled one"}[p.prompts]
        raise EvalUsageError(f"--protocol {protocol} needs --judge-prompts with {what}")
    if mode and mode != p.mode:
        raise EvalUsageError(f"--protocol {protocol} judges in mode {p.mode}, not --mode {mode}")
    if p.mode not in book.modes:
        raise EvalUsageError(f"{judge_prompts} lacks the {p.mode} prompts that --protocol {protocol} needs")
    if swap is not None and swap != p.swap and p.mode != "single":
        raise EvalUsageError(f"--protocol {protocol} {'always' if p.swap else 'never'} judges both answer orders; "
                             "drop the swap option")
    return JudgeSetup(p.mode, book, p.swap, protocol)


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    question: Question
    turn: int  # 1-based
    model_a: str  # the canonical pair (model_b is the baseline when there is one)
    model_b: str | None
    order: str | None  # "AB": model_a shown first; "BA": swapped; None in single mode
    reference: list[str] | None  # the question's reference turns when this judgment is reference-guided
    prompt: JudgePrompt

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
               swap: bool, references: dict, reference_categories, book=None) -> tuple[list[Job], int]:
    """All judge calls to make, and how many were impossible for lack of an answer.

    The prompt book decides which turns are judged, with which prompt and reference.
    """
    book = book or load_prompts()
    models = list(answers)
    units = [(m, None) for m in models] if mode == "single" else model_pairs(models, baseline)
    orders = [None] if mode == "single" else (["AB", "BA"] if swap else ["AB"])
    jobs, missing, no_reference = [], 0, []
    for q in questions:
        ref_turns = references.get(q.question_id) or q.reference
        for turn in range(1, len(q.turns) + 1):
            try:
                ref = book.reference_for(q.category, turn, ref_turns, reference_categories)
            except MissingReference:
                no_reference.append(q.question_id)
                continue
            prompt = book.choose(mode, category=q.category, turn=turn, n_turns=len(q.turns), guided=ref is not None)
            if prompt is None:
                continue  # the protocol does not judge this turn
            for a, b in units:
                if any(len(answers[m].get(q.question_id) or []) < turn for m in (a, b) if m):
                    missing += len(orders)
                    continue
                jobs.extend(Job(q, turn, a, b, o, ref, prompt) for o in orders)
    if no_reference:
        ids = ", ".join(map(str, dict.fromkeys(no_reference)))
        raise EvalUsageError(f"the {book.kind} protocol grades {', '.join(reference_categories)} questions against a "
                             f"reference answer, and these have none (or too few turns): {ids}; pass the reference "
                             "file with --reference (MT-bench: reference_answer/gpt-4.jsonl)")
    return jobs, missing


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
    if mode == "pairwise-5":  # "A>>B" ... "B>>A", positional
        if v == "A=B":
            return {"winner": "tie", "strong": False}
        return {"winner": "model_a" if (v[0] == "A") == first_is_a else "model_b", "strong": ">>" in v}
    if v == "tie":
        return {"winner": "tie"}
    shown_first = v == "A"
    return {"winner": "model_a" if shown_first == first_is_a else "model_b"}


def judge_one(job: Job, mode: str, answers: dict, book, endpoint: Endpoint, *, client=None,
              max_tokens: int | None = None, baseline: str | None = None, protocol: str | None = None) -> dict:
    q, t = job.question, job.turn
    shown = [answers[m][q.question_id][:t] for m in job.positions]
    messages = book.render(job.prompt, mode, questions=q.turns[:t], answers=shown, reference=job.reference)
    max_tokens = max_tokens or job.prompt.max_tokens
    rec: dict[str, Any] = {
        "judgment_id": job.key(mode),
        "question_id": q.question_id,
        "category": q.category,
        "turn": t,
        "mode": mode,
        "protocol": protocol,
        "model_a": job.model_a,
        "model_b": job.model_b,
        "order": job.order,
        "positions": job.positions,
        "baseline": baseline,
        "judge_model": endpoint.model,
        "prompt_version": book.version,
        "prompt_name": job.prompt.name,
        "prompt_sha": job.prompt.sha,
        "temperature": job.prompt.temperature,
        "max_tokens": max_tokens,
        "reference_guided": job.reference is not None,
        # characters of each model's answer to this turn: the length-controlled win rate needs them
        "answer_lengths": {m: len(answers[m][q.question_id][t - 1]) for m in dict.fromkeys(job.positions)},
        # tokens and markdown elements of each answer to this turn: the style-controlled ratings need them
        "answer_style": {m: style_of(answers[m][q.question_id][t - 1]) for m in dict.fromkeys(job.positions)},
    }
    try:
        reply = chat(endpoint, messages, temperature=job.prompt.temperature, max_tokens=max_tokens, client=client)
    except CompletionFailed as e:
        return {**rec, "status": "error", "error": str(e), "attempts": e.attempts, "usage": None, "raw": None,
                "parsed": None, "result": None, "tstamp": time.time()}
    parsed = parse_judgment(mode, reply.text)
    return {**rec, "status": parsed["status"], "error": None, "attempts": reply.attempts, "usage": reply.usage,
            "raw": reply.text, "parsed": parsed, "result": to_canonical(mode, job, parsed), "tstamp": time.time()}


# ---------------------------------------------------------------- the command


def run_judge(
    questions: list[Question],
    answers_dir: Path,
    models: list[str],
    endpoint: Endpoint,
    output: Path,
    *,
    mode: str | None = None,
    setup: JudgeSetup | None = None,
    baseline: str | None = None,
    references: dict | None = None,
    reference_categories=REFERENCE_CATEGORIES,
    swap: bool = True,
    parallel: int = 1,
    force: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Judge what is not judged yet in ``output``; returns counts.

    ``setup`` (see ``resolve_setup``) gives the mode, prompts and swap; without it, ``mode``
    and ``swap`` with our own default prompts. ``max_tokens`` overrides the prompts' own.
    """
    setup = setup or JudgeSetup(mode or "pairwise-score", load_prompts(), swap)
    mode = setup.mode
    if mode not in MODES:
        raise EvalUsageError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if len(set(models)) != len(models) or not models:
        raise EvalUsageError("--models must name one or more distinct models")
    if mode != "single" and len(models) < 2:
        raise EvalUsageError(f"--mode {mode} compares models: give at least two in --models")
    if baseline and baseline not in models:
        raise EvalUsageError(f"--baseline {baseline!r} must be one of --models ({', '.join(models)})")
    if setup.protocol and PROTOCOLS[setup.protocol].needs_baseline and not baseline:
        raise EvalUsageError(f"--protocol {setup.protocol} compares every model with one --baseline "
                             + ("(shown second, as the blog's Vicuna-13B was)" if setup.protocol == "vicuna-blog" else
                                "(Arena-Hard's fixed baseline model, whose answers are in --answers)"))
    output = Path(output)
    answers = {m: load_answers(find_answer_file(Path(answers_dir), m)) for m in models}
    jobs, missing = build_jobs(questions, answers, mode, baseline=baseline, swap=setup.swap,
                               references=references or {}, reference_categories=set(reference_categories),
                               book=setup.book)
    if not jobs:
        raise EvalUsageError(f"nothing to judge: no question in the question file has answers from "
                             f"{'every model' if mode == 'single' else 'both models of a pair'} in {answers_dir} "
                             "(do --questions and the answer files match? compare their question_id values)")
    if missing:
        log.warning("%d judgments skipped: an answer is missing or failed (see the answer files' 'status')", missing)
    with OutputLock(output):
        counts = _run_jobs(jobs, setup, answers, endpoint, output, baseline=baseline, parallel=parallel, force=force,
                           max_tokens=max_tokens)
    return {"jobs": len(jobs), "missing_answers": missing, **counts}


def _run_jobs(jobs: list[Job], setup: JudgeSetup, answers: dict, endpoint: Endpoint, output: Path, *,
              baseline: str | None, parallel: int, force: bool, max_tokens: int | None) -> dict[str, Any]:
    mode = setup.mode
    prepare_output(output, force)
    done: dict[str, dict] = {}
    for rec in read_log(output):
        for field, want in (("judge_model", endpoint.model), ("prompt_version", setup.book.version), ("mode", mode)):
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
    calls = [functools.partial(judge_one, j, mode, answers, setup.book, endpoint, client=client, max_tokens=max_tokens,
                               baseline=baseline, protocol=setup.protocol) for j in todo]
    with AppendLog(output) as out, interrupt_note(output, out):
        for rec in run_parallel(calls, parallel, "judge", "call"):
            out.append(rec)
            counts[rec["status"]] += 1
            if rec["status"] == "error":
                log.warning("judgment %s failed: %s", rec["judgment_id"], rec["error"])
            elif rec["status"] == "unparsed":
                log.warning("judgment %s unparsed: %s", rec["judgment_id"], rec["parsed"].get("reason"))
    final = _compact(output, [j.key(mode) for j in jobs])
    totals = {s: sum(r.get("status") == s for r in final) for s in ("ok", "unparsed", "error")}
    return {"skipped_done": len(jobs) - len(todo), **counts, "file": totals}


def judged_exit_code(totals: dict[str, int], min_parsed: float, output: Path) -> int:
    """1 when judgments failed or too few parsed (a judge ignoring the format is failed work)."""
    answered = totals["ok"] + totals["unparsed"]
    if totals["unparsed"]:
        share = totals["ok"] / answered
        log.warning("%d of %d judgments in %s could not be parsed (%.0f%% parsed); they are kept and counted, never "
                    "scored -- inspect them with `vicuna eval parse`", totals["unparsed"], answered, output, 100 * share)
        if share < min_parsed:
            log.error("only %.0f%% of the judgments parsed, below --min-parsed %g: the judge does not follow the "
                      "prompt's output format", 100 * share, min_parsed)
            return 1
    return 1 if totals["error"] else 0


def _compact(output: Path, order: list[str]) -> list[dict]:
    """One record per judgment (a final status beats an error; later beats earlier), in job order."""
    best: dict[str, dict] = {}
    for rec in read_log(output):
        k = rec.get("judgment_id")
        if k not in best or rec.get("status") in FINAL or best[k].get("status") not in FINAL:
            best[k] = rec
    rank = {k: i for i, k in enumerate(order)}
    records = sorted(best.values(), key=lambda r: rank.get(r.get("judgment_id"), len(rank)))
    write_records(output, records, force=True)
    return records
