"""Bradley-Terry / Elo maths on synthetic battles drawn from known strengths."""

from __future__ import annotations

import math

import pytest
from conftest import bradley_terry_battles

from vicuna.ratings import (
    bootstrap_bradley_terry,
    expected_win_rate,
    fit_bradley_terry,
    online_elo,
)

TRUTH = {"alpha": 1200.0, "bravo": 1100.0, "charlie": 1000.0, "delta": 900.0, "echo": 800.0}  # mean 1000


def synthetic_battles(n: int, seed: int, tie_rate: float = 0.0):
    """Battles whose expected score follows the BT model with TRUTH ratings."""
    return bradley_terry_battles(TRUTH, n, seed, tie_rate)


def test_recovers_order_and_values():
    ratings = fit_bradley_terry(synthetic_battles(6000, seed=1))
    assert list(ratings) == list(TRUTH)  # best first, true order
    for m, r in ratings.items():
        assert abs(r - TRUTH[m]) < 30, (m, r)
    assert math.isclose(sum(ratings.values()) / len(ratings), 1000.0)


def test_exact_two_player_mle():
    # 3 wins of a, 1 of b, 2 ties -> a scored 4 of 6: odds 2 -> 400*log10(2) apart (prior ~0).
    battles = [("a", "b", "model_a")] * 3 + [("b", "a", "model_a")] + [("a", "b", "tie")] * 2
    r = fit_bradley_terry(battles, prior=1e-9)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(2), abs=1e-3)


def test_ties_count_half():
    only_ties = [("a", "b", "tie")] * 10 + [("b", "c", "tie (bothbad)")] * 10
    r = fit_bradley_terry(only_ties)
    assert all(v == pytest.approx(1000.0, abs=1e-6) for v in r.values())


def test_undefeated_model_stays_finite():
    r = fit_bradley_terry([("a", "b", "model_a")] * 20 + [("b", "c", "model_a")] * 20)
    assert list(r) == ["a", "b", "c"]
    assert all(math.isfinite(v) for v in r.values())


def test_bootstrap_intervals_cover_truth():
    battles = synthetic_battles(3000, seed=7, tie_rate=0.2)
    intervals = bootstrap_bradley_terry(battles, rounds=200, seed=3)
    assert list(intervals) == list(TRUTH)
    for m, iv in intervals.items():
        assert iv.lower < iv.rating < iv.upper
        assert iv.lower <= TRUTH[m] <= iv.upper, (m, iv)
        assert iv.upper - iv.lower < 120  # informative, not trivially wide
    again = bootstrap_bradley_terry(battles, rounds=200, seed=3)
    assert again == intervals  # seeded -> reproducible


def test_online_elo_orders_models():
    r = online_elo(synthetic_battles(6000, seed=2), k=4)
    assert list(r) == list(TRUTH)
    assert math.isclose(sum(r.values()), 1000.0 * len(r))  # zero-sum updates


def test_mapping_battles_and_expected_win_rate():
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_b"}] * 3 + [("x", "y", "model_a")]
    r = fit_bradley_terry(battles, prior=1e-9)
    p = expected_win_rate(r)
    assert p["y"]["x"] == pytest.approx(0.75, abs=1e-4)
    assert p["x"]["y"] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([("a", "b", "a")], "winner must be one of"),
        ([("a", "a", "tie")], "cannot battle itself"),
        ([("a", "b")], "expected (model_a, model_b, winner)"),
        ([{"model_a": "a", "winner": "tie"}], "missing key"),
    ],
)
def test_bad_battles_are_named(bad, message):
    with pytest.raises(ValueError, match=r"battle 0: .*" + __import__("re").escape(message)):
        fit_bradley_terry(bad)


def test_empty():
    assert fit_bradley_terry([]) == {}
    assert bootstrap_bradley_terry([], rounds=5) == {}
