"""The evaluation on a real model (SmolLM2-135M-Instruct served by `vicuna serve`).

* MT-bench end to end (issue 16 item 6): the real model answers 5 MT-bench questions (both
  turns) through `vicuna eval run --protocol mt-bench-single`; a scripted judge on 127.0.0.1
  grades them; every prompt it receives must be FastChat's template filled in, and the
  report's numbers are recomputed here from the scripted scores.
* The model as its own judge (issue 12 item 5): it answers 5 Vicuna-80 questions and then
  judges them; a 135M judge rarely follows the format, and every unparsed judgment must be
  counted in the report while the run goes to the end.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import SHARED_DATA, run_cli
from test_eval_e2e import served_model
from test_eval_fakes import ScriptedServer
from test_eval_shared_data import fill

pytestmark = [pytest.mark.real_model, pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "mt_bench").is_dir(), reason=f"no shared data at {SHARED_DATA}")]

MT = SHARED_DATA / "mt_bench"
PROMPTS = SHARED_DATA / "judge_prompts" / "fastchat_judge_prompts.jsonl"
QUESTION_IDS = (81, 91, 101, 111, 121)  # writing, roleplay, reasoning, math, coding
NEED_REF = {"math", "reasoning", "coding"}
# Generous: on an idle machine every call takes seconds, but a shared CPU can be 30x slower.
REQUEST_TIMEOUT, CLI_TIMEOUT = 900, 1800
# The scripted judge's grades: (question, turn) -> rating; None = it rambles without one.
GRADES = {(81, 1): 7, (81, 2): 5, (91, 1): 6, (91, 2): 8, (101, 1): 3, (101, 2): None, (111, 1): 9, (111, 2): 4,
          (121, 1): 5, (121, 2): 2}


@pytest.fixture(scope="module")
def served(real_model_dir):
    """`vicuna serve` on the real model, once for the module (a small KV budget: short prompts only)."""
    with served_model(real_model_dir, "smollm2", "--max-batch-size", "4", "--max-model-len", "4096") as url:
        yield url


def test_mt_bench_single_end_to_end_on_the_real_model(tmp_path, served):
    questions = {q["question_id"]: q for q in map(json.loads, (MT / "question.jsonl").read_text().splitlines())}
    qfile = tmp_path / "mt5.jsonl"
    qfile.write_text("".join(json.dumps(questions[i]) + "\n" for i in QUESTION_IDS))
    refs = {r["question_id"]: r["choices"][0]["turns"]
            for r in map(json.loads, (MT / "reference_answer" / "gpt-4.jsonl").read_text().splitlines())}
    templates = {p["name"]: p for p in map(json.loads, PROMPTS.read_text().splitlines())}

    def qid_turn(user: str) -> tuple[int, int]:
        for qid in QUESTION_IDS:
            q = questions[qid]
            if q["turns"][-1] in user and "### User:" in user:
                return qid, 2
            if q["turns"][0] in user and "### User:" not in user:
                return qid, 1
        raise AssertionError(f"unknown judge prompt: {user[:200]!r}")

    def grade(body, n):
        qid, turn = qid_turn(body["messages"][1]["content"])
        g = GRADES[(qid, turn)]
        return f"The answer is short.\n\nRating: [[{g}]]" if g is not None else "I cannot grade this properly."

    with ScriptedServer(grade) as judge:
        proc = run_cli("eval", "run", "--protocol", "mt-bench-single", "--questions", qfile, "--reference",
                       MT / "reference_answer" / "gpt-4.jsonl", "--judge-prompts", PROMPTS, "--model", "smollm2",
                       "--api-base", served, "--max-answer-tokens", "16", "--judge-model", "gpt-4",
                       "--judge-api-base", judge.base_url, "--parallel", "4", "--bootstrap-rounds", "20",
                       "--timeout", str(REQUEST_TIMEOUT), "-o", tmp_path / "out", timeout=CLI_TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        received = list(judge.requests)

    answers = {r["question_id"]: r["choices"][0]["turns"]
               for r in map(json.loads, (tmp_path / "out/answers/smollm2.jsonl").read_text().splitlines())}
    assert sorted(answers) == list(QUESTION_IDS) and all(len(t) == 2 and all(x.strip() for x in t)
                                                        for t in answers.values())

    # Every judge call: FastChat's prompt for the category and turn, filled in exactly.
    assert len(received) == 10
    for body in received:
        qid, turn = qid_turn(body["messages"][1]["content"])
        q, a = questions[qid], answers[qid]
        ref = q["category"] in NEED_REF
        name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
        fields = {"question": q["turns"][0], "answer": a[0], "question_1": q["turns"][0], "question_2": q["turns"][1],
                  "answer_1": a[0], "answer_2": a[1]}
        if ref:
            fields.update(ref_answer_1=refs[qid][0], ref_answer_2=refs[qid][1])
        t = templates[name]
        assert body["messages"] == [{"role": "system", "content": t["system_prompt"]},
                                    {"role": "user", "content": fill(t["prompt_template"], fields)}], (qid, turn)
        assert (body["temperature"], body["max_tokens"], body["model"]) == (0, 2048, "gpt-4")

    # The report, by hand: mean rating per turn and over all graded turns (the MT-bench score).
    res = json.loads((tmp_path / "out/report/results.json").read_text())
    row = res["models"]["smollm2"]
    graded = {k: g for k, g in GRADES.items() if g is not None}
    turn1 = [g for (_, t), g in graded.items() if t == 1]
    turn2 = [g for (_, t), g in graded.items() if t == 2]
    assert row["avg_score_turn"] == {"1": pytest.approx(sum(turn1) / 5), "2": pytest.approx(sum(turn2) / 4)}
    assert row["avg_score"] == pytest.approx((30 + 19) / 9) == pytest.approx(sum(graded.values()) / len(graded))
    assert res["judgments"] == {"ok": 9, "unparsed": 1, "error": 0, "total": 10}
    assert res["protocols"] == ["mt-bench-single"]
    md = (tmp_path / "out/report/report.md").read_text()
    assert f"| {49 / 9:.2f} | {30 / 5:.2f} | {19 / 4:.2f} |" in md and "MT-bench score" in md


def test_the_real_model_answers_and_judges_itself_to_the_end(tmp_path, served):
    bench = [json.loads(x) for x in (SHARED_DATA / "vicuna_bench" / "question.jsonl").read_text().splitlines()][:5]
    qfile = tmp_path / "vicuna5.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in bench))
    proc = run_cli("eval", "answer", "--questions", qfile, "--model", "smollm2", "--api-base", served,
                   "--max-tokens", "16", "--timeout", str(REQUEST_TIMEOUT), "-o", tmp_path / "answers" / "smollm2.jsonl",
                   timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "5 answered, 0 already done, 0 failed" in proc.stdout

    proc = run_cli("eval", "judge", "--questions", qfile, "--answers", tmp_path / "answers", "--models", "smollm2",
                   "--mode", "single", "--judge-model", "smollm2", "--judge-api-base", served, "--max-tokens", "24",
                   "--min-parsed", "0", "--judge-timeout", str(REQUEST_TIMEOUT), "-o", tmp_path / "judgments.jsonl",
                   timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {r["status"] for r in records} <= {"ok", "unparsed"}  # none failed, none lost
    unparsed = sum(r["status"] == "unparsed" for r in records)
    assert all(r["raw"] for r in records) and all(r["max_tokens"] == 24 for r in records)
    assert all(r["usage"]["completion_tokens"] <= 24 for r in records)
    m = re.search(r"(\d+) judged, (\d+) unparsed, 0 failed", proc.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (5 - unparsed, unparsed)

    proc = run_cli("eval", "report", "--judgments", tmp_path / "judgments.jsonl", "-o", tmp_path / "rep",
                   "--bootstrap-rounds", "10")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "rep/results.json").read_text())
    assert res["judgments"] == {"ok": 5 - unparsed, "unparsed": unparsed, "error": 0, "total": 5}
    assert res["models"]["smollm2"]["unparsed"] == unparsed
    assert f"**unparsed {unparsed}**" in (tmp_path / "rep/report.md").read_text()
    scores = [r["result"]["score"] for r in records if r["status"] == "ok"]
    if scores:  # whatever the tiny judge managed to grade is averaged, nothing else
        assert res["models"]["smollm2"]["avg_score"] == pytest.approx(sum(scores) / len(scores))
