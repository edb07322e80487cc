"""Acceptance: `vicuna serve` (tiny model) answers, a scripted judge judges, the report adds up by hand."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from conftest import cli_server, run_cli
from test_eval_fakes import Reply, ScriptedServer, user_text
from vicuna.eval.records import builtin_questions_path

# The judge's opinion per category: the tiny random model vs a scripted reference bot.
TINY = {"writing": 4, "roleplay": 5, "extraction": 2, "reasoning": 1, "math": 3, "coding": 2, "stem": 3, "humanities": 4}
REFBOT = {"writing": 8, "roleplay": 5, "extraction": 7, "reasoning": 9, "math": 9, "coding": 8, "stem": 6, "humanities": 7}
UNPARSED_AT = (11, 1, "refbot")  # (question, turn, model shown first): the judge rambles without scores
FAILING_AT = (16, 2, "tiny")  # the judge endpoint answers 500 every time


@contextlib.contextmanager
def served_model(model_dir, name: str, *extra: str, start_timeout: float = 300):
    """`vicuna serve MODEL` in a subprocess on a loopback port of its own; yields its /v1 base URL."""
    with cli_server("serve", "--model-path", model_dir, "--model-name", name, *extra, ready=("/v1/models",),
                    timeout=start_timeout) as server:
        yield f"{server.url}/v1"


@pytest.fixture
def tiny_server(tiny_model_dir):
    with served_model(tiny_model_dir, "tiny", start_timeout=120) as url:
        yield url


def _answers_in(prompt: str) -> list[str]:
    return [re.search(rf"\[Assistant {i}'s Answer\]\n(.*?)\n\[End of Assistant {i}'s Answer\]", prompt, re.S).group(1)
            for i in (1, 2)]


@pytest.mark.slow
def test_serve_answer_judge_report_end_to_end(tmp_path, tiny_server):
    questions = [json.loads(x) for x in builtin_questions_path().read_text().splitlines()]
    by_text = {t: (q["question_id"], i + 1, q["category"]) for q in questions for i, t in enumerate(q["turns"])}
    answers = tmp_path / "answers"

    # 1. The tiny model behind `vicuna serve` answers the built-in question set (all turns).
    proc = run_cli("eval", "answer", "--model", "tiny", "--api-base", tiny_server, "--max-tokens", "12",
                   "--parallel", "4", "-o", answers / "tiny.jsonl")
    assert proc.returncode == 0, proc.stderr
    tiny = [json.loads(x) for x in (answers / "tiny.jsonl").read_text().splitlines()]
    assert len(tiny) == 20 and all(r["status"] == "ok" for r in tiny)
    assert [len(r["choices"][0]["turns"]) for r in tiny] == [len(q["turns"]) for q in questions]

    # 2. A scripted reference bot answers too (the "ChatGPT" of this evaluation).
    with ScriptedServer(lambda body, n: f"[refbot] A careful answer to: {user_text(body)}") as bot:
        run_cli("eval", "answer", "--model", "refbot", "--api-base", bot.base_url, "-o", answers / "refbot.jsonl",
                check=True)

    # 3. A scripted judge scores by the model it recognises, with one malformed output and one dead call.
    def judge(body, n):
        prompt = user_text(body)
        qid, turn, cat = by_text[re.search(r"\[Question\]\n(.*?)\n\n\[Assistant 1", prompt, re.S).group(1)]
        shown = ["refbot" if a.startswith("[refbot]") else "tiny" for a in _answers_in(prompt)]
        if (qid, turn, shown[0]) == UNPARSED_AT:
            return "Both assistants try hard. Assistant 1 has 3 good points and Assistant 2 has 5."
        if (qid, turn, shown[0]) == FAILING_AT:
            return Reply(status=500)
        s1, s2 = ({"tiny": TINY, "refbot": REFBOT}[m][cat] for m in shown)
        return f"{s1} {s2}\nAssistant 1 {'wins' if s1 > s2 else 'does not win'} on {cat}."

    with ScriptedServer(judge) as j:
        proc = run_cli("eval", "judge", "--answers", answers, "--models", "tiny,refbot", "--baseline", "refbot",
                       "--judge-model", "judge-x", "--judge-api-base", j.base_url, "--judge-retries", "1",
                       "--judge-backoff", "0.01", "--parallel", "4", "-o", tmp_path / "judgments.jsonl")
        assert proc.returncode == 1  # one judgment failed for good: reported, not fatal
        n_turns = sum(len(q["turns"]) for q in questions)
        assert len(j.requests) == 2 * n_turns + 1  # +1: the retry of the failing call

    proc = run_cli("eval", "report", "--judgments", tmp_path / "judgments.jsonl", "-o", tmp_path / "report",
                   "--bootstrap-rounds", "100")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "report/results.json").read_text())

    # 4. The same numbers by hand.
    turns = [(q["question_id"], i + 1, q["category"]) for q in questions for i in range(len(q["turns"]))]
    complete = [t for t in turns if t[:2] not in (UNPARSED_AT[:2], FAILING_AT[:2])]
    tiny_total = sum(TINY[c] for *_, c in complete)
    bot_total = sum(REFBOT[c] for *_, c in complete)
    ties = sum(TINY[c] == REFBOT[c] for *_, c in complete)
    row = res["models"]["tiny"]
    assert res["baseline"] == "refbot"
    assert row["total_score"] == tiny_total and row["baseline_total"] == bot_total
    assert row["relative_score"] == pytest.approx(tiny_total / bot_total)
    assert (row["wins"], row["ties"], row["losses"]) == (0, ties, len(complete) - ties)
    assert res["judgments"] == {"ok": 2 * n_turns - 2, "unparsed": 1, "error": 1, "total": 2 * n_turns}
    assert res["judge"] == {"complete": len(complete), "incomplete": 2, "swapped": len(complete),
                            "consistent": len(complete), "consistency_rate": 1.0}
    for t in ("1", "2"):
        mine = [TINY[c] for _, turn, c in complete if str(turn) == t]
        assert row["avg_score_turn"][t] == pytest.approx(sum(mine) / len(mine))
    math = [t for t in complete if t[2] == "math"]
    assert res["categories"]["math"]["tiny"]["relative_score"] == pytest.approx(3 / 9)
    assert res["categories"]["math"]["tiny"]["comparisons"] == len(math)
    assert res["models"]["refbot"]["rating"] > row["rating"]
    md = (tmp_path / "report/report.md").read_text()
    assert f"{100 * tiny_total / bot_total:.1f}%" in md and "**unparsed 1**" in md and "**failed 1**" in md
