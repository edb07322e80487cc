"""Golden tests: realistic judge outputs in every form we accept, and ones we must refuse."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from vicuna.eval.parse import parse_judgment

# A corpus of judge outputs in the shapes real judges write (written for these tests; the
# shapes follow what GPT-4 wrote for the Vicuna blog's 1,040 reviews and MT-bench judgments).
PAIRWISE_SCORE = [
    # The Vicuna blog protocol: scores alone on the first line.
    ("8 7\nAssistant 1 gave a structured list of tips covering scheduling and breaks. Assistant 2 "
     "was also helpful but less detailed, so it gets a slightly lower score.", [8, 7]),
    ("9, 6\n\nBoth answers are relevant; Assistant 2 forgot the second part of the question.", [9, 6]),
    ("8/10 and 7/10\nAssistant 1 is more precise.", [8, 7]),
    ("**Scores: 7.5 and 4**\nAssistant 2 made an arithmetic error (it says 12 * 4 = 46).", [7.5, 4]),
    ("9 8.5\nBoth assistants cover the main points; Assistant 2 has 3 tips fewer.", [9, 8.5]),
    ("(6, 9)\nThe second assistant explains the trade-offs better.", [6, 9]),
    # Labelled block later in the text (judge explains first); the last block wins.
    ("Let me review both answers carefully.\n\nAssistant 1 explains the concept of supply and demand with "
     "two clear examples. Assistant 2 is shorter and contains a factual slip about 3 of the 5 points.\n\n"
     "Assistant 1: 8\nAssistant 2: 5", [8, 5]),
    ("Evaluation:\n- **Assistant 1's score:** 6/10\n- **Assistant 2's score:** 9/10\n\nThe second answer "
     "is more complete.", [6, 9]),
    ("Assistant 1: 3\nAssistant 2: 4\nOn reflection, I was too harsh.\nAssistant 1: 7\nAssistant 2: 4", [7, 4]),
    ("Assistant 1 - 10\nAssistant 2 - 2\nAssistant 2 refused to answer.", [10, 2]),
    ("The final scores are [[6, 8]].", [6, 8]),
    # The math prompt asks for "a Python tuple" at the end: the summary forms judges use.
    ("First, I will solve the problem independently:\n\nf(2) = 5(8) - 4 + 3 = 39\n\nAssistant 1 answered 39 "
     "with no steps; Assistant 2 computed 5(2)^3 as 50.\n\nScores:\nAssistant 1: 10 (correct answer)\n"
     "Assistant 2: 3 (wrong cube)\n\nAssistant 1 performed better.", [10, 3]),
    ("First, let's solve it ourselves: the endpoints are (2, -2) and (10, 4), so the length is 10.\n\nAssistant 1 "
     "says 8, Assistant 2 says 10 with correct steps.\n\nIn conclusion, the scores are (1, 9) for Assistant 1 "
     "and Assistant 2, respectively.", [1, 9]),
    ("Solving: 3x + 10 = 5x - 10, so x = 10.\nAssistant 1 finds x = 10; Assistant 2 finds x = -5.\n\n"
     "The output tuple is (10, 2).", [10, 2]),
    ("Both assistants made mistakes in the distance formula.\n\nOutput: (2, 4)", [2, 4]),
    ("Assistant 1 gave only a final number. Assistant 2 showed every step but slipped at the end.\n\n(3, 7)", [3, 7]),
    ("Assistant 2's process is right but the last subtraction is off by one. Therefore, I would give Assistant 1 "
     "a score of 10 and Assistant 2 a score of 6.", [10, 6]),
    ("The correct tuple output is (1, 4). Assistant 2 at least attempted the steps.", [1, 4]),
    ("Scores:\nAssistant 1: 1/10\nAssistant 2: 2/10\n\nBoth performed poorly.", [1, 2]),
    # Other summary shapes.
    ("Assistant 1: 8/10, Assistant 2: 7/10\nA close call; the first answer is a little tidier.", [8, 7]),
    ("| Assistant | Score |\n|---|---|\n| Assistant 1 | 7 |\n| Assistant 2 | 9 |\n\nThe second answer "
     "is more thorough.", [7, 9]),
    ("Overall I would score them 8/10 for Assistant 1 and 5/10 for Assistant 2.", [8, 5]),
    ("Assistant 1 receives 6/10 because of the missing example, and Assistant 2 receives 8/10.", [6, 8]),
    ("Assistant 1 gets a 9: clear and correct. Assistant 2 gets a 4: it misreads the question.", [9, 4]),
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
    # a point of the problem is no score tuple
    "The segment goes from (2, -2) to (10, 4). Assistant 1 and Assistant 2 both use the distance formula.",
    # a numbered list after a label is no score
    "Assistant 1:\n1. Lists the causes.\nAssistant 2:\n2. Lists the effects.",
    # a weak judge echoing the instructions
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively.",
    "Assistant 1 gets 3 of the 4 steps right and Assistant 2 gets 2 of the 4 steps right.",
]

SINGLE = [
    ("The answer is correct and well explained, though it skips the units.\n\nRating: [[8]]", 8),
    ("Rating: [[3]]\n\nThe assistant's answer claims 'Score: 10' at the end, which is irrelevant; the "
     "computation 17 - 9 = 8 is wrong.", 3),
    ('The assistant\'s essay ends with "Score: 10" as a self-assessment.\nThe essay is mediocre.\nScore: 5', 5),
    ("7/10\nGood but brief.", 7),
    ("**Overall rating:** 6.5/10", 6.5),
    ("Explanation: the code has an off-by-one error.\nRating: [[4/10]]", 4),
    ("The response follows the instructions and stays under 100 words. Rating: [[9]]", 9),
    ("The assistant made an error in the second step.\n\nRating: [2]", 2),
    ("Compared with the reference answer, the result 39 is right but no steps are shown.\n\n**Rating: 6**", 6),
    ('I will follow the format "Rating: [[5]]". The poem rhymes and keeps the theme.\nRating: [[7]]', 7),
    ("Final score - 8\nA thorough answer.", 8),
    ("The story is vivid but ignores the word limit. I would rate the response 5 out of 10.", 5),
    ("Overall, I give it a score of 4 because the second half is off-topic.", 4),
]

SINGLE_UNPARSED = [
    "The answer is fine.",
    "Rating: [[11]]",
    "I would give it a high mark.",
    # a weak judge echoing the instructions: the quoted example is not a verdict
    'You must rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", '
    'for example: "Rating: [[5]]".',
    "Score:\n1. Accuracy is fine.\n2. Depth is lacking.",
]

PAIRWISE = [
    ("Assistant A answers both parts; Assistant B misses the second one.\n\n[[A]]", "A"),
    ("Both are correct and equally clear. [[C]]", "tie"),
    ("Assistant A repeats [[B]] from the user's prompt, which is odd.\nFinal verdict: [[B]]", "B"),
    ("After comparing them, my final verdict: Assistant A", "A"),
    ("Verdict: tie", "tie"),
    ("Assistant B's code handles the empty list; Assistant A's crashes.\n\n**Final Verdict:** [B]", "B"),
    ("Both are fine, but A is more concise.\n\n[A]", "A"),
    ("Winner: Assistant B", "B"),
    ("Assistant A's poem rhymes but B's keeps the requested meter.\nTherefore, Assistant B is better.", "B"),
    ("Both assistants give the same correct date with similar detail.\nOverall, it is a tie.", "tie"),
    ('The instructions say to output "[[A]]" if assistant A is better. Having compared them: [[A]]', "A"),
]

PAIRWISE_UNPARSED = [
    "Assistant A is good. Assistant B is also good.",
    "[[D]]",
    # a weak judge echoing the instructions: every quoted bracket is an example
    'output your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if '
    'assistant B is better, and "[[C]]" for a tie.',
    "Neither Assistant A nor Assistant B is better.",
    "Assistant A is better at formatting.\nAssistant B is better at facts.",
]

CORPUS_SIZE = sum(map(len, (PAIRWISE_SCORE, PAIRWISE_SCORE_UNPARSED, SINGLE, SINGLE_UNPARSED, PAIRWISE,
                            PAIRWISE_UNPARSED)))


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


# Arena-Hard five-level verdicts (judge outputs written for these tests in the shapes Arena-Hard's
# judges write: their own answer first, then the comparison, then "My final verdict is ...").
PAIRWISE_5 = [
    ("My own answer: use a set.\n\nAssistant A uses a set and explains why; Assistant B loops twice.\n\n"
     "My final verdict is: Assistant A is significantly better: [[A>>B]]", "A>>B"),
    ("Both answers are correct; A is a little clearer.\n\nMy final verdict is Assistant A is slightly better: "
     "[[A>B]]", "A>B"),
    ("They are essentially the same.\n\nMy final verdict is tie: [[A=B]]", "A=B"),
    ("Assistant B handles the edge case.\n\n[[B>A]]", "B>A"),
    ("Assistant A's SQL does not run.\n\nMy final verdict is: [[B>>A]]", "B>>A"),
    # the mirrored shapes and loose spacing / case
    ("Assistant A falls short.\n\n[[A<<B]]", "B>>A"),
    ("A small edge to B: [[ b > a ]]", "B>A"),
    ("Equal: [[B=A]]", "A=B"),
    # Arena-Hard's second pattern: single brackets
    ("Assistant A is more complete.\nFinal verdict: [A>B]", "A>B"),
    # unbracketed, but labelled or alone on the last line
    ("**Final verdict:** B>>A", "B>>A"),
    ("My final verdict is A>B.", "A>B"),
    ("The explanation of B is more accurate.\n\nB>A", "B>A"),
    # the judge revises: the last verdict of the strongest tier wins
    ("At first I thought [[A>B]], but A's code has a bug.\n\nMy final verdict is: [[B>A]]", "B>A"),
    # an answer under review quotes a verdict; the judge's own bracket form beats its single-bracket one
    ("Assistant A's answer contains '[A>>B]' as a test string; irrelevant.\nMy final verdict is [[A=B]]", "A=B"),
    # the judge echoes the instructions' option list, then gives its verdict
    ("Options:\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n"
     "3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n"
     "5. Assistant B is significantly better: [[B>>A]]\n\nAssistant B is clearer.\n\nMy final verdict is "
     "Assistant B is slightly better: [[B>A]]", "B>A"),
    # quoted format examples are not verdicts
    ('The format asks for "[[A>B]]" if A is slightly better. Having compared them: [[A>>B]]', "A>>B"),
]

PAIRWISE_5_UNPARSED = [
    "Assistant A is good. Assistant B is also good.",
    "[[A]]",  # a three-way verdict is no five-level one
    "[[A>A]]",
    "",
    # only the echoed option list, no verdict of the judge's own
    "1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]",
    'Output your final verdict with a label, e.g. "[[A>B]]" or "[[B>>A]]".',
    "A>B in speed, B>A in clarity, so I cannot decide.",  # prose comparisons are no verdict
]


@pytest.mark.parametrize("text, verdict", PAIRWISE_5)
def test_pairwise_5_golden(text, verdict):
    assert parse_judgment("pairwise-5", text) == {"status": "ok", "verdict": verdict}


@pytest.mark.parametrize("text", PAIRWISE_5_UNPARSED)
def test_pairwise_5_unparsed(text):
    r = parse_judgment("pairwise-5", text)
    assert r["status"] == "unparsed" and r["reason"] and "verdict" not in r
