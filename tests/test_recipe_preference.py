"""`vicuna recipe preference`: arena battles -> votes -> pairs -> DPO -> battles again -> leaderboard (issue 26).

The end-to-end test runs the whole loop on SmolLM2 at short settings: real LoRA trainings, the web app on
127.0.0.1 driven over HTTP by Gradio's client, votes in a real SQLite file, `vicuna data pairs`, a DPO LoRA,
a second round with the tuned adapter, the leaderboard. The voters are checked alone first.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_cli
from test_eval_fakes import ScriptedServer

from vicuna.recipe import CAPITALS, JudgeVoter, CapitalQuestion, preference_questions, rules_vote

PARIS = CapitalQuestion("What is the capital of France?", "France", "Paris")


def test_rules_voter_prefers_the_right_answer_then_the_shorter():
    short, long = "The capital of France is Paris.", "Great question! " * 5 + "The capital is Paris, of course."
    assert rules_vote(PARIS, short, long, tie_margin=3) == "model_a"
    assert rules_vote(PARIS, long, short, tie_margin=3) == "model_b"
    assert rules_vote(PARIS, "Lyon.", long, tie_margin=3) == "model_b"  # right beats short
    assert rules_vote(PARIS, short, "It is Paris, France.", tie_margin=3) == "tie"  # within the margin
    assert rules_vote(PARIS, "Lyon.", "", tie_margin=3) == "tie (bothbad)"


def test_question_sets_are_disjoint_and_a_too_large_round_is_refused():
    rng = random.Random(0)
    countries = sorted(CAPITALS)
    first = preference_questions(countries[:3], 10, rng)
    second = preference_questions(countries[:3], 8, rng, avoid={q.text for q in first})
    assert len({q.text for q in first + second}) == 18 and all(q.answer == CAPITALS[q.country] for q in first)
    from vicuna.errors import RecipeError

    with pytest.raises(RecipeError, match="ask for fewer"):
        preference_questions(countries[:3], 19, rng)


def _scores(first: int, second: int) -> str:
    return f"{first} {second}\nMy reasons."


def test_judge_voter_asks_both_orders_and_a_positional_verdict_is_a_tie():
    def fair(body, n):  # scores the shorter answer higher, wherever it is shown
        text = body["messages"][-1]["content"]
        a1 = text.split("[Assistant 1's Answer]")[1].split("[End of Assistant 1's Answer]")[0]
        a2 = text.split("[Assistant 2's Answer]")[1].split("[End of Assistant 2's Answer]")[0]
        return _scores(9, 4) if len(a1) < len(a2) else _scores(4, 9)

    short, long = "Paris.", "The capital of France is, as everyone knows, Paris."
    with ScriptedServer(fair) as s:
        voter = JudgeVoter(s.base_url, "judge", "NO_SUCH_KEY_ENV")
        assert voter(PARIS, short, long) == "model_a" and voter(PARIS, long, short) == "model_b"
        assert len(s.requests) == 4  # two orders per vote
        assert short in s.requests[0]["messages"][-1]["content"]
    with ScriptedServer(lambda body, n: _scores(9, 4)) as s:  # always prefers whatever is shown first
        assert JudgeVoter(s.base_url, "judge", "NO_SUCH_KEY_ENV")(PARIS, short, long) == "tie"
    assert JudgeVoter("http://127.0.0.1:9/v1", "judge", "X")(PARIS, "", " ") == "tie (bothbad)"  # asks no one


def test_bad_settings_are_refused_before_any_work(tmp_path):
    p = run_cli("recipe", "preference", "--work-dir", tmp_path / "w", "--voter", "judge")
    assert p.returncode != 0 and "--judge-url and --judge-model" in p.stderr
    p = run_cli("recipe", "preference", "--work-dir", tmp_path / "w", "--battles", "0")
    assert p.returncode != 0 and "--battles must be at least 1" in p.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_the_loop_runs_end_to_end_on_smollm2(real_model_dir, tmp_path):
    work = tmp_path / "loop"
    p = run_cli("recipe", "preference", "--work-dir", work, "--model-path", real_model_dir, "--sft-steps", "4",
                "--battles", "6", "--dpo-steps", "6", "--max-tokens", "40", "--battle-temperature", "0",
                timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    from vicuna.serve.arena import ArenaStore

    with ArenaStore(work / "arena.db", create=False) as store:
        votes = list(store.iter_votes())
    assert len(votes) == 12 and all(v["anony"] for v in votes)  # 6 blind battles a round, voted over HTTP
    round_two = votes[6:]
    assert any("tuned" in (v["model_a"], v["model_b"]) for v in round_two)
    assert not any("tuned" in (v["model_a"], v["model_b"]) for v in votes[:6])

    results = json.loads((work / "results.json").read_text())
    pairs = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    decided = [v for v in votes[:6] if v["winner"] in ("model_a", "model_b") and not v["void"]]
    assert len(pairs) == results["pairs"]["written"] == len(decided) > 0  # ties and both-bad dropped
    for pair in pairs:  # the chosen side is what the voter preferred
        vote = next(v for v in decided if v["conversation_a"][0]["content"] == pair["prompt"][-1]["content"])
        side = vote["winner"][-1]
        assert pair["chosen"][-1]["content"] == vote[f"conversation_{side}"][-1]["content"]

    dpo = results["dpo"]
    assert len(dpo) == 6 and {"margin", "accuracy", "rewards_chosen"} <= set(dpo[-1]) and dpo[-1]["margin"] > 0
    assert (work / "adapters" / "tuned" / "loss.png").stat().st_size > 10_000  # loss, margin and accuracy
    assert "dpo" in (work / "adapters" / "tuned" / "README.md").read_text()  # its model card
    ranked = {r["model"] for r in results["leaderboard"]["ratings"]}
    assert ranked == {"SmolLM2-135M-Instruct", "concise", "wordy", "tuned"}
    report = (work / "report.md").read_text()
    for section in ("## Round one", "## Pairs", "## DPO", "## Round two", "## Leaderboard"):
        assert section in report
    assert (work / "leaderboard.png").exists() and "| tuned |" in report
