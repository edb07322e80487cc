"""Report measures beyond scores: judge tokens and cost, the length-controlled win rate, and
agreement between judges or between a judge and the arena's human votes (issue 16 items 4, 5)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import run_cli
from test_eval_fakes import ScriptedServer, usage, user_text
from test_eval_pipeline import QUESTIONS, answered, judge, prompt_parts  # noqa: F401 -- `answered` is a fixture
from vicuna.eval.report import length_controlled_win_rate


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_length_controlled_win_rate_is_the_fit_at_equal_length():
    # Two length groups (+40 and -40 characters): the fit has a closed form. With win shares
    # p_long and p_short, theta + phi*c = logit(p_long) and theta - phi*c = logit(p_short),
    # so the LC win rate sigmoid(theta) = sigmoid((logit(p_long) + logit(p_short)) / 2).
    def comps(n_long_wins, n_long, n_short_wins, n_short):
        out = []
        for n_wins, n, d in ((n_long_wins, n_long, 40), (n_short_wins, n_short, -40)):
            out += [{"winner": "model_a" if i < n_wins else "model_b", "len_a": 100 + d, "len_b": 100}
                    for i in range(n)]
        return out

    lc = length_controlled_win_rate(comps(6, 8, 1, 4))  # raw win rate 7/12 = 58%
    assert lc == pytest.approx(sigmoid((logit(6 / 8) + logit(1 / 4)) / 2), abs=1e-3)
    # a judge swayed by length alone: the model wins 3 of 4 when longer and 1 of 4 when shorter
    lc = length_controlled_win_rate(comps(9, 12, 1, 4))
    assert lc == pytest.approx(sigmoid((logit(9 / 12) + logit(1 / 4)) / 2), abs=1e-3) == pytest.approx(0.5, abs=1e-3)
    ties = [{"winner": "tie", "len_a": 100 + d, "len_b": 100} for d in (40, -40, 40, -40)]
    assert length_controlled_win_rate(ties) == pytest.approx(0.5)
    same_length = [{"winner": w, "len_a": 50, "len_b": 50} for w in ("model_a", "model_a", "model_a", "model_b")]
    assert length_controlled_win_rate(same_length) == pytest.approx(0.75, abs=1e-3)  # nothing to control for
    assert length_controlled_win_rate(same_length[:1]) is None
    everything = [{"winner": "model_a", "len_a": 100 + d, "len_b": 100} for d in (40, -40, 40)]
    assert length_controlled_win_rate(everything) > 0.99  # finite, though one model wins all


def write_answers(folder: Path, model: str, texts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{model}.jsonl").write_text("".join(
        json.dumps({"question_id": q, "model_id": model, "choices": [{"index": 0, "turns": [t]}]}) + "\n"
        for q, t in texts.items()))


def test_report_shows_judge_tokens_cost_and_the_length_controlled_win_rate(tmp_path):
    # 12 one-turn questions; "long" answers are 40 characters longer than "base"'s on 8 of them and
    # 40 shorter on 4. The judge prefers "long" on 6 of the 8 and 1 of the 4, in both orders.
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"Question {i}?"]}) + "\n"
                             for i in range(12)))
    base = {i: "b" * 100 for i in range(12)}
    long = {i: ("x" * 140 if i < 8 else "x" * 60) for i in range(12)}
    write_answers(tmp_path / "answers", "long", long)
    write_answers(tmp_path / "answers", "base", base)
    prefers_long = {0, 1, 2, 3, 4, 5, 8}

    def verdict(body, n):
        text = user_text(body)
        qid = int(re.search(r"Question (\d+)\?", text).group(1))
        long_first = re.search(r"\[Assistant A's Answer\]\n(x+|b+)", text).group(1).startswith("x")
        return "[[A]]" if (qid in prefers_long) == long_first else "[[B]]"

    with ScriptedServer(verdict) as s:
        proc = run_cli("eval", "judge", "--questions", qfile, "--answers", tmp_path / "answers", "--models",
                       "long,base", "--baseline", "base", "--mode", "pairwise", "--judge-model", "judge-x",
                       "--judge-api-base", s.base_url, "-o", tmp_path / "j.jsonl", check=True)
        calls = list(s.requests)
    assert len(calls) == 24
    records = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert all(r["answer_lengths"] == {"long": len(long[r["question_id"]]), "base": 100} for r in records)

    proc = run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep", "--price-input", "2.5",
                   "--price-output", "10", "--bootstrap-rounds", "10", check=True)
    res = json.loads((tmp_path / "rep/results.json").read_text())
    # tokens by hand: the scripted server counts one token per word of the messages and of the reply
    prompt_tokens = sum(usage(b, "x")["prompt_tokens"] for b in calls)
    completion_tokens = len(calls)  # "[[A]]" / "[[B]]": one word each
    assert res["judge_tokens"] == {"calls": 24, "calls_with_usage": 24, "prompt_tokens": prompt_tokens,
                                   "completion_tokens": completion_tokens,
                                   "price_per_million": {"prompt": 2.5, "completion": 10.0},
                                   "cost": pytest.approx((prompt_tokens * 2.5 + completion_tokens * 10) / 1e6)}
    row = res["models"]["long"]
    assert (row["wins"], row["losses"]) == (7, 5) and row["win_rate"] == pytest.approx(7 / 12)
    assert row["win_rate_length_controlled"] == pytest.approx(sigmoid((logit(6 / 8) + logit(1 / 4)) / 2), abs=1e-3)
    md = (tmp_path / "rep/report.md").read_text()
    assert "LC win rate" in md and f"{100 * row['win_rate_length_controlled']:.1f}%" in md
    assert f"{prompt_tokens:,} prompt + {completion_tokens:,} completion" in md and "cost $" in md
    half = run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep2", "--price-input", "1")
    assert half.returncode == 2 and "give both --price-input and --price-output" in half.stderr


# ---------------------------------------------------------------- agreement

TURNS = [(q["question_id"], i + 1) for q in QUESTIONS for i in range(len(q["turns"]))]
# (question, turn) -> the winner each judge sees; "split" = the judge contradicts itself across orders (a tie)
JUDGE_1 = dict(zip(TURNS, ["alpha", "alpha", "beta", "tie", "alpha", "split"]))
JUDGE_2 = dict(zip(TURNS, ["alpha", "beta", "beta", "tie", "tie", "alpha"]))


def verdict_judge(table):
    def respond(body, n):
        p = prompt_parts(body)
        qid, turn = next((q["question_id"], i + 1) for q in QUESTIONS for i, t in enumerate(q["turns"]) if t == p["question"])
        want = table[(qid, turn)]
        if want == "split":
            return "[[A]]"  # whoever is shown first
        if want == "tie":
            return "[[C]]"
        return "[[A]]" if p["models"][0] == want else "[[B]]"
    return respond


def expected_agreement(first: dict, second: dict, keys) -> dict:
    norm = lambda v: "tie" if v in ("tie", "split") else v  # noqa: E731
    pairs = [(norm(first[k]), norm(second[k])) for k in keys]
    no_ties = [(a, b) for a, b in pairs if "tie" not in (a, b)]
    return {"with_ties": (sum(a == b for a, b in pairs), len(pairs)),
            "without_ties": (sum(a == b for a, b in no_ties), len(no_ties))}


def test_agreement_of_two_judges_with_and_without_ties(tmp_path, answered):  # noqa: F811
    for name, table in (("one", JUDGE_1), ("two", JUDGE_2)):
        with ScriptedServer(verdict_judge(table)) as s:
            judge(tmp_path, s, answered, "--mode", "pairwise", out=f"{name}.jsonl", check=True)
    proc = run_cli("eval", "agreement", tmp_path / "one.jsonl", tmp_path / "two.jsonl", "-o", tmp_path / "agree.json",
                   check=True)
    res = json.loads((tmp_path / "agree.json").read_text())
    assert res["comparisons"] == {"both": 6, "only_first": 0, "only_second": 0}
    for turn, keys in (("turn 1", [k for k in TURNS if k[1] == 1]), ("turn 2", [k for k in TURNS if k[1] == 2]),
                       ("all", TURNS)):
        want = expected_agreement(JUDGE_1, JUDGE_2, keys)
        for setup in ("with_ties", "without_ties"):
            got = res[turn][setup]
            assert (got["agree"], got["total"]) == want[setup], (turn, setup)
    assert (res["all"]["with_ties"]["agree"], res["all"]["with_ties"]["total"]) == (3, 6)  # by eye, too
    assert (res["all"]["without_ties"]["agree"], res["all"]["without_ties"]["total"]) == (2, 3)
    assert "50.0% (3/6)" in proc.stdout and "66.7% (2/3)" in proc.stdout
    none = run_cli("eval", "agreement", tmp_path / "one.jsonl")
    assert none.returncode == 2 and "a second judgment file or with --arena-db" in none.stderr


def test_agreement_of_a_judge_with_arena_votes(tmp_path):
    from vicuna.serve.arena import ArenaStore

    db = tmp_path / "arena.db"
    battles = [  # (user turns, answers of model_a, answers of model_b, the human's vote)
        (["Tell me a joke."], ["GOOD joke"], ["meh"], "model_a"),
        (["Capital of France?"], ["meh"], ["GOOD: Paris"], "model_b"),
        (["Name a colour.", "Another one?"], ["red", "GOOD blue"], ["green", "meh"], "model_a"),
        (["Say hi."], ["GOOD hi"], ["GOOD hello"], "tie (bothbad)"),
        (["Count to 3."], ["1 2 3"], ["GOOD 1, 2, 3"], "model_a"),  # the judge disagrees
    ]
    with ArenaStore(db, salt="test-salt-0123456789") as store:
        for i, (users, a, b, winner) in enumerate(battles):
            for side, answers, model in (("a", a, "vicuna-7b"), ("b", b, "llama-13b")):
                msgs = [m for u, x in zip(users, answers) for m in ({"role": "user", "content": u},
                                                                  {"role": "assistant", "content": x})]
                store.save_conversation(f"c{i}{side}", mode="battle", model=model, messages=msgs)
            store.add_vote(mode="battle", model_a="vicuna-7b", model_b="llama-13b", conv_a=f"c{i}a", conv_b=f"c{i}b",
                           winner=winner, anonymous=True)
        store.save_conversation("v-a", mode="battle", model="x", messages=[{"role": "user", "content": "q"},
                                                                          {"role": "assistant", "content": "GOOD"}])
        store.save_conversation("v-b", mode="battle", model="y", messages=[{"role": "user", "content": "q"},
                                                                          {"role": "assistant", "content": "bad"}])
        store.add_vote(mode="battle", model_a="x", model_b="y", conv_a="v-a", conv_b="v-b", winner="model_b",
                       anonymous=True, void_reason="identity leak")
    before = db.read_bytes()

    proc = run_cli("eval", "arena-export", "--db", db, "-o", tmp_path / "set", check=True)
    assert "5 votes exported" in proc.stdout and "1 void or incomplete skipped" in proc.stdout
    questions = [json.loads(x) for x in (tmp_path / "set/question.jsonl").read_text().splitlines()]
    assert [q["turns"] for q in questions] == [b[0] for b in battles]
    assert questions[0]["arena_models"] == ["vicuna-7b", "llama-13b"]

    def good_judge(body, n):  # prefers the answer that says GOOD; [[C]] when both or neither do
        text = user_text(body)
        a = "GOOD" in re.search(r"\[Assistant A's Answer\]\n(.*?)\n\[End", text, re.S).group(1)
        b = "GOOD" in re.search(r"\[Assistant B's Answer\]\n(.*?)\n\[End", text, re.S).group(1)
        return "[[A]]" if a and not b else "[[B]]" if b and not a else "[[C]]"

    with ScriptedServer(good_judge) as s:
        run_cli("eval", "judge", "--questions", tmp_path / "set/question.jsonl", "--answers", tmp_path / "set/answers",
                "--models", "model_a,model_b", "--mode", "pairwise", "--judge-model", "judge-x", "--judge-api-base",
                s.base_url, "-o", tmp_path / "j.jsonl", check=True)
    proc = run_cli("eval", "agreement", tmp_path / "j.jsonl", "--arena-db", db, "-o", tmp_path / "agree.json",
                   check=True)
    res = json.loads((tmp_path / "agree.json").read_text())
    # By hand: votes are compared at the conversation's last turn. Judge: a, b, a (turn 2), tie, b.
    # Humans: a, b, a, tie, a -> with ties 4 of 5 agree; without ties 3 of 4 (the tie drops out).
    assert res["comparisons"]["both"] == 5 and res["comparisons"]["only_first"] == 1  # turn 1 of the 2-turn battle
    assert (res["all"]["with_ties"]["agree"], res["all"]["with_ties"]["total"]) == (4, 5)
    assert (res["all"]["without_ties"]["agree"], res["all"]["without_ties"]["total"]) == (3, 4)
    assert (res["turn 2"]["with_ties"]["agree"], res["turn 2"]["with_ties"]["total"]) == (1, 1)
    assert db.read_bytes() == before  # read only
    again = run_cli("eval", "arena-export", "--db", db, "-o", tmp_path / "set")
    assert again.returncode == 2 and "--force" in again.stderr
    missing = run_cli("eval", "agreement", tmp_path / "j.jsonl", "--arena-db", tmp_path / "nope.db")
    assert missing.returncode == 2 and "no arena database" in missing.stderr
