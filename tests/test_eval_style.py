"""Style control: Bradley-Terry with answer-style covariates (FastChat's style-controlled leaderboard)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import bradley_terry_battles

from vicuna.ratings import (
    STYLE_FEATURES, bootstrap_bradley_terry, bootstrap_style_controlled, fit_bradley_terry, style_covariates, style_of,
)

QUALITY = {"alpha": 1100.0, "bravo": 1050.0, "charlie": 1000.0, "verbose": 950.0}


def length_biased_battles(n: int, seed: int, length_effect: float = 2.5):
    """Battles where the voters favour the longer answer: ``verbose`` writes the longest
    answers and is the weakest once length is accounted for. Answer lengths vary within
    every model, so the length effect and the model strengths can be told apart."""
    rng = np.random.default_rng(seed)
    names = list(QUALITY)
    battles, style_a, style_b = [], [], []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        la, lb = (int(rng.uniform(300, 900) if m == "verbose" else rng.uniform(40, 450)) for m in (a, b))
        logit = math.log(10) / 400 * (QUALITY[a] - QUALITY[b]) + length_effect * (la - lb) / (la + lb)
        u = rng.random()
        p = 1 / (1 + math.exp(-logit))
        winner = "model_a" if u < p - 0.05 else "model_b" if u > p + 0.05 else "tie"  # ~10% ties, E[score] = p
        battles.append((a, b, winner))
        style_a.append({"tokens": la, "headers": int(rng.integers(0, 3)), "lists": int(rng.integers(0, 6)),
                        "bold": int(rng.integers(0, 4))})
        style_b.append({"tokens": lb, "headers": int(rng.integers(0, 3)), "lists": int(rng.integers(0, 6)),
                        "bold": int(rng.integers(0, 4))})
    return battles, style_a, style_b


def test_style_control_removes_a_planted_length_bias():
    battles, sa, sb = length_biased_battles(4000, seed=3)
    raw = fit_bradley_terry(battles)
    assert next(iter(raw)) == "verbose"  # length buys the raw top rank
    sc = bootstrap_style_controlled(battles, sa, sb, rounds=20, seed=0)
    assert list(sc.ratings) == ["alpha", "bravo", "charlie", "verbose"]  # the true order once length is held fixed
    for m, iv in sc.ratings.items():
        assert abs(iv.rating - QUALITY[m]) < 40, (m, iv)
        assert iv.lower <= iv.rating <= iv.upper
    tokens = sc.coefficients["tokens"]
    assert tokens.lower > 50  # a clear, positive length effect (Elo points per SD of the length share)
    for f in ("headers", "lists", "bold"):  # noise features: small effects
        assert abs(sc.coefficients[f].rating) < 25, (f, sc.coefficients[f])


def test_without_style_effects_it_agrees_with_plain_bradley_terry():
    truth = {"a": 1150.0, "b": 1000.0, "c": 850.0}
    battles = bradley_terry_battles(truth, 3000, seed=5, tie_rate=0.2)
    rng = np.random.default_rng(0)
    styles = [{f: int(rng.integers(1, 300)) for f in STYLE_FEATURES} for _ in range(2 * len(battles))]
    sc = bootstrap_style_controlled(battles, styles[::2], styles[1::2], rounds=10)
    raw = bootstrap_bradley_terry(battles, rounds=10)
    assert list(sc.ratings) == list(raw) == ["a", "b", "c"]
    for m in truth:
        assert abs(sc.ratings[m].rating - raw[m].rating) < 15


def independent_fit(battles, style_a, style_b, reg: float) -> dict[str, float]:
    """The same model written as a textbook L2 logistic regression solved by IRLS: one row
    per battle outcome (a tie is a won and a lost row of weight 1/2), features built here
    from the raw counts, no shared code with vicuna.ratings."""
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    feats = []
    for f in STYLE_FEATURES:
        col = []
        for s, t in zip(style_a, style_b):
            total = s[f] + t[f]
            col.append((s[f] - t[f]) / total if total else 0.0)
        both = np.array(col + [-c for c in col])  # the battles seen from both sides: mean 0
        col = np.array(col)
        feats.append((col - both.mean()) / both.std() if both.std() > 0 else np.zeros_like(col))
    rows, ys, ws = [], [], []
    for n, (a, b, w) in enumerate(battles):
        row = [1.0 if m == a else -1.0 if m == b else 0.0 for m in names] + [c[n] for c in feats]
        outcomes = [(1.0, 1.0)] if w == "model_a" else [(0.0, 1.0)] if w == "model_b" else [(1.0, 0.5), (0.0, 0.5)]
        for y, weight in outcomes:
            rows.append(row)
            ys.append(y)
            ws.append(weight)
    X, y, W = np.array(rows), np.array(ys), np.array(ws)
    beta = np.zeros(X.shape[1])
    for _ in range(200):
        p = 1 / (1 + np.exp(-X @ beta))
        s = W * p * (1 - p)
        z = X @ beta + (y - p) / (p * (1 - p))
        new = np.linalg.solve(X.T @ (s[:, None] * X) + reg * np.eye(X.shape[1]), X.T @ (s * z))
        if np.max(np.abs(new - beta)) < 1e-13:
            beta = new
            break
        beta = new
    theta = beta[: len(names)] * 400 / math.log(10)
    out = {m: float(t - theta.mean() + 1000) for m, t in zip(names, theta)}
    out.update({f"coef:{f}": float(c * 400 / math.log(10)) for f, c in zip(STYLE_FEATURES, beta[len(names):])})
    return out


@pytest.mark.parametrize("reg", [0.5, 5.0])
def test_equals_an_independent_logistic_regression(reg):
    battles, sa, sb = length_biased_battles(600, seed=11)
    sc = bootstrap_style_controlled(battles, sa, sb, rounds=1, reg=reg)
    ref = independent_fit(battles, sa, sb, reg)
    for m, iv in sc.ratings.items():
        assert iv.rating == pytest.approx(ref[m], abs=1e-6)
    for f, iv in sc.coefficients.items():
        assert iv.rating == pytest.approx(ref[f"coef:{f}"], abs=1e-6)


def test_style_features_and_their_normalisation():
    text = ("# Plan\n\nSome **bold** words and __more__.\n\n- one\n- two\n1. three\n\n"
            "```python\n# not a header\n- not a list\n```\n## End")
    s = style_of(text)
    assert (s["headers"], s["lists"], s["bold"]) == (2, 3, 2)
    assert s["tokens"] > 20
    assert style_of(["- a", "- b\n- c"])["lists"] == 3  # summed over turns
    x = style_covariates([{"tokens": 30, "headers": 0, "lists": 1, "bold": 0}] * 2 + [{"tokens": 10, "headers": 0,
                          "lists": 0, "bold": 0}], [{"tokens": 10, "headers": 0, "lists": 1, "bold": 0}] * 3)
    assert x.shape == (3, 4)
    assert np.allclose(np.sqrt((x[:, 0] ** 2).mean()), 1)  # unit scale over both orientations
    assert np.all(x[:, 1] == 0)  # 0/0 headers: no difference, not NaN
    # swapping the sides of a battle flips the sign of its covariates (and leaves the others alone)
    sa = [{"tokens": 30, "headers": 2, "lists": 1, "bold": 0}, {"tokens": 10, "headers": 0, "lists": 3, "bold": 1}]
    sb = [{"tokens": 10, "headers": 1, "lists": 1, "bold": 2}, {"tokens": 20, "headers": 1, "lists": 0, "bold": 1}]
    x, y = style_covariates(sa, sb), style_covariates([sb[0], sa[1]], [sa[0], sb[1]])
    assert np.allclose(y[0], -x[0]) and np.allclose(y[1], x[1])


def test_orientation_does_not_change_the_fit():
    """All battles written as (model, baseline), or half of them the other way round, is the same data."""
    battles, sa, sb = length_biased_battles(800, seed=2)
    swap = {"model_a": "model_b", "model_b": "model_a", "tie": "tie"}
    flipped = [((b, a, swap[w]), y, x) if k % 2 else ((a, b, w), x, y)
               for k, ((a, b, w), x, y) in enumerate(zip(battles, sa, sb))]
    one = bootstrap_style_controlled(battles, sa, sb, rounds=1)
    two = bootstrap_style_controlled([f[0] for f in flipped], [f[1] for f in flipped], [f[2] for f in flipped],
                                     rounds=1)
    for m in QUALITY:
        assert two.ratings[m].rating == pytest.approx(one.ratings[m].rating, abs=1e-6)


def test_a_model_is_not_charged_for_its_opponents_style():
    """Every battle is (model, baseline); only 'verbose' writes long answers, 'plain' writes like the
    baseline and always loses to it: style control must not lift 'plain' (centring on the one-sided
    mean of the length covariate would)."""
    battles, sa, sb = [], [], []
    short = {"tokens": 50, "headers": 0, "lists": 0, "bold": 0}
    for k in range(200):
        long_ = {"tokens": 400 + k, "headers": 2, "lists": 5, "bold": 3}
        battles += [("verbose", "base", "model_a"), ("plain", "base", "model_b" if k % 5 else "tie")]
        sa += [long_, short]
        sb += [short, short]
    sc = bootstrap_style_controlled(battles, sa, sb, rounds=5, anchor="base")
    assert sc.ratings["plain"].rating < sc.ratings["base"].rating == pytest.approx(1000)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one entry per battle"):
        bootstrap_style_controlled([("a", "b", "model_a")], [], [])
    with pytest.raises(ValueError, match="reg"):
        bootstrap_style_controlled([("a", "b", "model_a")], [{}], [{}], reg=0)
