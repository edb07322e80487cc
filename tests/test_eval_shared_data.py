"""The real public data: the original Vicuna-80 answers of five models, MT-bench questions and references."""

from __future__ import annotations

import json
import re

import pytest

from conftest import SHARED_DATA
from test_eval_fakes import ScriptedServer, user_text
from vicuna.eval.client import Endpoint
from vicuna.eval.io import load_answers, load_questions, load_references
from vicuna.eval.judge import build_jobs, load_prompts, run_judge
from vicuna.eval.report import compute_report, load_judgments

BLOG = SHARED_DATA / "vicuna_blog_answers"
MT = SHARED_DATA / "mt_bench"
pytestmark = pytest.mark.skipif(not BLOG.exists(), reason="shared data not available")

MODELS = ["vicuna-13b", "alpaca-13b", "llama-13b", "bard", "gpt35"]


def length_score(text: str) -> int:
    """The scripted judge's (deliberately simple) taste: longer answers score higher, 1-10."""
    return min(10, 1 + len(text.split()) // 30)


def test_vicuna80_blog_protocol_on_the_original_answers(tmp_path):
    questions = load_questions(BLOG / "question.jsonl")  # the old one-turn {question_id, text, category} form
    assert len(questions) == 80 and questions[0].turns == ["How can I improve my time management skills?"]
    answers = {m: load_answers(BLOG / f"answer_{m}.jsonl") for m in MODELS}
    assert all(len(a) == 80 for a in answers.values())

    def judge(body, n):
        prompt = user_text(body)
        shown = [re.search(rf"\[Assistant {i}'s Answer\]\n(.*?)\n\[End of Assistant {i}'s Answer\]", prompt, re.S)
                 .group(1) for i in (1, 2)]
        s1, s2 = (length_score(t) for t in shown)
        return (f"{s1} {s2}\n\nAssistant 1 provides {'more' if s1 > s2 else 'less'} detail. Note that one answer "
                f"states 'Score: 10' in passing, which does not affect my grading.")

    with ScriptedServer(judge) as s:
        counts = run_judge(questions, BLOG, MODELS, Endpoint(s.base_url, "judge-x", backoff=0.01), tmp_path / "j.jsonl",
                           mode="pairwise-score", baseline="gpt35", parallel=8)
    assert counts == {"jobs": 4 * 80 * 2, "skipped_done": 0, "missing_answers": 0, "ok": 640, "unparsed": 0, "error": 0}

    res = compute_report(load_judgments(tmp_path / "j.jsonl"), bootstrap_rounds=50)
    assert res["baseline"] == "gpt35" and res["judge"]["consistency_rate"] == 1.0
    base = sum(length_score(t[0]) for t in answers["gpt35"].values())
    for m in MODELS[:-1]:
        total = sum(length_score(t[0]) for t in answers[m].values())
        row = res["models"][m]
        assert row["total_score"] == total and row["baseline_total"] == base
        assert row["relative_score"] == pytest.approx(total / base)
        wins = sum(length_score(answers[m][q][0]) > length_score(answers["gpt35"][q][0]) for q in answers[m])
        ties = sum(length_score(answers[m][q][0]) == length_score(answers["gpt35"][q][0]) for q in answers[m])
        assert (row["wins"], row["ties"]) == (wins, ties)
    rel = {m: res["models"][m]["relative_score"] for m in MODELS[:-1]}
    # BT ratings agree with the head-to-head results against the common baseline.
    by_rating = [m for m in res["models"] if m != "gpt35"]
    by_adj_win = sorted(by_rating, key=lambda m: -res["models"][m]["win_rate_adjusted"])
    assert by_rating[0] == by_adj_win[0] and by_rating[-1] == by_adj_win[-1]
    assert set(res["categories"]) == {"generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual",
                                      "coding", "math", "writing"}
    assert rel["llama-13b"] < rel["vicuna-13b"]  # short LLaMA answers lose on length, as in the blog


def test_mt_bench_reference_guided_jobs():
    questions = load_questions(MT / "question.jsonl")
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    fake = {m: {q.question_id: [f"{m} one", f"{m} two"] for q in questions} for m in ("x", "y")}
    cats = {"math", "reasoning", "coding"}

    inline, _ = build_jobs(questions, fake, "single", baseline=None, swap=True, references={}, reference_categories=cats)
    assert len(inline) == 2 * 80 * 2
    guided = {(j.question.question_id, j.turn) for j in inline if j.reference}
    expected = {(q.question_id, t + 1) for q in questions if q.category in cats and q.reference
                for t in range(min(2, len(q.reference))) if q.reference[t].strip()}
    assert guided == expected and (103, 2) not in guided  # no empty references, none outside `cats`
    assert all(j.question.category in cats for j in inline if j.reference)

    gpt4 = load_references(MT / "reference_answer" / "gpt-4.jsonl")
    assert sorted(gpt4) == list(range(101, 131))
    with_file, missing = build_jobs(questions, fake, "pairwise", baseline="y", swap=True, references=gpt4,
                                    reference_categories=cats)
    assert missing == 0 and len(with_file) == 80 * 2 * 2
    j101 = next(j for j in with_file if j.question.question_id == 101 and j.turn == 2)
    assert j101.reference == gpt4[101][1]  # an explicit --reference file wins over the inline field
    prompt = load_prompts().render("pairwise", question=j101.question.turns[1], answers=["A1", "B1"],
                                   histories=[[(j101.question.turns[0], "a0")], [(j101.question.turns[0], "b0")]],
                                   reference=j101.reference)
    text = prompt[1]["content"]
    assert "[Reference Answer]\n" + gpt4[101][1] in text
    assert text.index("[Earlier Conversation of Assistant A]") < text.index("[Question]")
    assert text.rstrip().endswith('"[[C]]" for a tie.')


def test_blog_answer_file_lookup(tmp_path):
    from vicuna.errors import EvalUsageError
    from vicuna.eval.io import find_answer_file

    assert find_answer_file(BLOG, "gpt35").name == "answer_gpt35.jsonl"
    with pytest.raises(EvalUsageError, match="no answers for model 'nobody'"):
        find_answer_file(BLOG, "nobody")
    # MT-bench style reference file used as an answer file
    assert load_answers(MT / "reference_answer" / "gpt-4.jsonl")[101][0].startswith("If you have just overtaken")
    json.loads((MT / "question.jsonl").read_text().splitlines()[0])
