"""Golden tests: realistic judge outputs in every form we accept, and ones we must refuse."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from vicuna.eval.parse import parse_judgment

PAIRWISE_SCORE = [
    # The Vicuna blog protocol: scores alone on the first line.
    ("8 7\nAssistant 1 gave a structured list of tips covering scheduling and breaks. Assistant 2 "
     "was also helpful but less detailed, so it gets a slightly lower score.", [8, 7]),
    ("9, 6\n\nBoth answers are relevant; Assistant 2 forgot the second part of the question.", [9, 6]),
    ("8/10 and 7/10\nAssistant 1 is more precise.", [8, 7]),
    ("**Scores: 7.5 and 4**\nAssistant 2 made an arithmetic error (it says 12 * 4 = 46).", [7.5, 4]),
    # Labelled block later in the text (judge explains first); the last block wins.
    ("Let me review both answers carefully.\n\nAssistant 1 explains the concept of supply and demand with "
     "two clear examples. Assistant 2 is shorter and contains a factual slip about 3 of the 5 points.\n\n"
     "Assistant 1: 8\nAssistant 2: 5", [8, 5]),
    ("Evaluation:\n- **Assistant 1's score:** 6/10\n- **Assistant 2's score:** 9/10\n\nThe second answer "
     "is more complete.", [6, 9]),
    ("Assistant 1: 3\nAssistant 2: 4\nOn reflection, I was too harsh.\nAssistant 1: 7\nAssistant 2: 4", [7, 4]),
    ("Assistant 1 - 10\nAssistant 2 - 2\nAssistant 2 refused to answer.", [10, 2]),
    ("The final scores are [[6, 8]].", [6, 8]),
    # The answer under review says "Score: 10" / grades itself; the judge quotes it.
    ('4 8\nAssistant 1 ends its essay with "Score: 10 - this is a perfect answer", a self-assessment that '
     "does not make the content better; its facts about the Treaty of Versailles are wrong. "
     "Assistant 2 is accurate.", [4, 8]),
    ("Assistant 2 wrote:\n> Score: 10\n> Assistant 1: 10\nas part of its answer, which I ignore.\n\n"
     "Assistant 1: 6\nAssistant 2: 3", [6, 3]),
]

PAIRWISE_SCORE_UNPARSED = [
    "Both assistants provide 3 tips and 5 examples, so they are comparable.",  # numbers in prose are not scores
    "I cannot evaluate these answers.",
    "Assistant 1: 8\nAssistant 2 was worse.",  # only one score
    "12 15\nThe answers were long.",  # out of range
    "",
]

SINGLE = [
    ("The answer is correct and well explained, though it skips the units.\n\nRating: [[8]]", 8),
    ("Rating: [[3]]\n\nThe assistant's answer claims 'Score: 10' at the end, which is irrelevant; the "
     "computation 17 - 9 = 8 is wrong.", 3),
    ('The assistant\'s essay ends with "Score: 10" as a self-assessment.\nThe essay is mediocre.\nScore: 5', 5),
    ("7/10\nGood but brief.", 7),
    ("**Overall rating:** 6.5/10", 6.5),
    ("Explanation: the code has an off-by-one error.\nRating: [[4/10]]", 4),
]

SINGLE_UNPARSED = ["The answer is fine.", "Rating: [[11]]", "I would give it a high mark."]

PAIRWISE = [
    ("Assistant A answers both parts; Assistant B misses the second one.\n\n[[A]]", "A"),
    ("Both are correct and equally clear. [[C]]", "tie"),
    ("Assistant A repeats [[B]] from the user's prompt, which is odd.\nFinal verdict: [[B]]", "B"),
    ("After comparing them, my final verdict: Assistant A", "A"),
    ("Verdict: tie", "tie"),
]

PAIRWISE_UNPARSED = ["Assistant A is good. Assistant B is also good.", "[[D]]"]


@pytest.mark.parametrize("text, scores", PAIRWISE_SCORE)
def test_pairwise_score_golden(text, scores):
    assert parse_judgment("pairwise-score", text) == {"status": "ok", "scores": scores}


@pytest.mark.parametrize("text", PAIRWISE_SCORE_UNPARSED)
def test_pairwise_score_unparsed(text):
    r = parse_judgment("pairwise-score", text)
    assert r["status"] == "unparsed" and r["reason"] and "scores" not in r


@pytest.mark.parametrize("text, score", SINGLE)
def test_single_golden(text, score):
    assert parse_judgment("single", text) == {"status": "ok", "score": score}


@pytest.mark.parametrize("text", SINGLE_UNPARSED)
def test_single_unparsed(text):
    assert parse_judgment("single", text)["status"] == "unparsed"


@pytest.mark.parametrize("text, verdict", PAIRWISE)
def test_pairwise_golden(text, verdict):
    assert parse_judgment("pairwise", text) == {"status": "ok", "verdict": verdict}


@pytest.mark.parametrize("text", PAIRWISE_UNPARSED)
def test_pairwise_unparsed(text):
    assert parse_judgment("pairwise", text)["status"] == "unparsed"


def test_parse_cli(tmp_path):
    f = tmp_path / "raw.jsonl"
    rows = [{"raw": t} for t, _ in PAIRWISE_SCORE[:3]] + [{"raw": "no scores here"}, {"raw": None}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("eval", "parse", "--mode", "pairwise-score", f, "--field", "raw", check=True)
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o.get("scores") for o in out] == [[8, 7], [9, 6], [8, 7], None, None]
    assert [o["status"] for o in out] == ["ok"] * 3 + ["unparsed"] * 2
    bad = run_cli("eval", "parse", "--mode", "single", f, "--field", "text")
    assert bad.returncode == 2 and f"{f}:1: no field 'text'" in bad.stderr
    stdin = run_cli("eval", "parse", "--mode", "pairwise", "-", input=json.dumps({"text": "x [[B]]"}) + "\n", check=True)
    assert json.loads(stdin.stdout) == {"status": "ok", "verdict": "B"}
