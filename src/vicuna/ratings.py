"""Leaderboard maths: Bradley-Terry ratings on the Elo scale, bootstrap intervals, online Elo,
and style control (Bradley-Terry with answer-style covariates).

Shared by the evaluation reports (judge verdicts) and the web arena (human votes), so it
depends on numpy only. A battle is ``(model_a, model_b, winner)`` with ``winner`` one of
``"model_a"``, ``"model_b"``, ``"tie"``, ``"tie (bothbad)"`` (a mapping with those three
keys works too). A tie counts as half a win for each side.

Why our own fit rather than scikit-learn's logistic regression (FastChat's route): battles
collapse into a k x k win matrix, so a damped Newton method on k log-strengths converges in
a handful of steps, needs no extra dependency and makes a 1,000-round bootstrap cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")

# Elo-scale conventions (as in chess and in LMSYS' leaderboard): 400 points = 10x odds.
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0


@dataclass(frozen=True)
class RatingInterval:
    """A rating with its bootstrap confidence interval."""

    rating: float
    lower: float
    upper: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_bootstrap(confidence: float, rounds: int, **positive: float) -> None:
    """The settings every bootstrapped fit shares, checked the same way (``positive``: strengths > 0)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0")


def _parse_battles(battles: Iterable) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Battles -> (models, index a, index b, score of a in {1, 0.5, 0})."""
    models: dict[str, int] = {}
    ia, ib, sa = [], [], []
    for n, battle in enumerate(battles):
        if isinstance(battle, Mapping):
            try:
                a, b, w = battle["model_a"], battle["model_b"], battle["winner"]
            except KeyError as e:
                raise ValueError(f"battle {n}: missing key {e}") from None
        else:
            try:
                a, b, w = battle
            except (TypeError, ValueError):
                raise ValueError(f"battle {n}: expected (model_a, model_b, winner), got {battle!r}") from None
        if w not in WINNERS:
            raise ValueError(f"battle {n}: winner must be one of {', '.join(WINNERS)}; got {w!r}")
        if a == b:
            raise ValueError(f"battle {n}: a model cannot battle itself ({a!r})")
        ia.append(models.setdefault(a, len(models)))
        ib.append(models.setdefault(b, len(models)))
        sa.append(1.0 if w == "model_a" else 0.0 if w == "model_b" else 0.5)
    return list(models), np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64), np.array(sa)


def _win_matrix(k: int, ia: np.ndarray, ib: np.ndarray, sa: np.ndarray, weights=None) -> np.ndarray:
    """W[i, j] = (weighted) wins of i over j, ties as halves."""
    w = np.ones_like(sa) if weights is None else weights
    wins = np.zeros((k, k))
    np.add.at(wins, (ia, ib), w * sa)
    np.add.at(wins, (ib, ia), w * (1.0 - sa))
    return wins


def _fit_log_strengths(wins: np.ndarray, prior: float, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximise the BT log-likelihood (+ prior) over natural log-strengths theta.

    The prior is ``prior`` virtual games per model, half won and half lost, against an
    anchor of strength 0: it keeps ratings finite when a model wins or loses every battle
    and is negligible once there are hundreds of battles.
    """
    k = wins.shape[0]
    games = wins + wins.T
    won = wins.sum(axis=1)
    theta = np.zeros(k)

    def objective(t):
        d = t[:, None] - t[None, :]
        ll = -(wins * np.logaddexp(0.0, -d)).sum()  # sum W_ij * log sigmoid(t_i - t_j)
        return ll - prior * np.logaddexp(0.0, t).sum() + 0.5 * prior * t.sum()

    current = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
        p0 = 1.0 / (1.0 + np.exp(-theta))
        grad = won - (games * p).sum(axis=1) + prior * (0.5 - p0)
        curv = games * p * (1.0 - p)
        hess = curv - np.diag(curv.sum(axis=1) + prior * p0 * (1.0 - p0))
        step = np.linalg.solve(hess, -grad)
        cand, value, moved = _damped_step(objective, theta, step, current)
        theta, improvement, current = cand, value - current, value
        if moved < tol or improvement < tol * 1e-3:
            break
    return theta


def _damped_step(objective, x: np.ndarray, step: np.ndarray, current: float) -> tuple[np.ndarray, float, float]:
    """Damped Newton for a concave ``objective``: halve ``step`` until the objective does not fall.
    Returns the new point, its objective and the largest coordinate move."""
    t = 1.0
    while t > 1e-8:
        cand = x + t * step
        value = objective(cand)
        if value >= current - 1e-12:
            break
        t *= 0.5
    return cand, value, float(np.max(np.abs(t * step)))


def _to_elo(theta: np.ndarray, scale: float, base: float, init_rating: float) -> np.ndarray:
    ratings = theta * scale / math.log(base)
    return ratings - ratings.mean() + init_rating


def _anchored(ratings: np.ndarray, at: int | None, init_rating: float) -> np.ndarray:
    return ratings if at is None else ratings - ratings[at] + init_rating


def fit_bradley_terry(
    battles: Iterable,
    *,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    prior: float = 1.0,
) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale, centred on ``init_rating``; best first.

    ``P(a beats b) = 1 / (1 + base ** ((R_b - R_a) / scale))``. ``prior`` > 0 virtual
    half-won games per model keep the estimate finite (see ``_fit_log_strengths``).
    """
    if prior <= 0:
        raise ValueError("prior must be > 0 (the MLE does not exist when a model wins or loses every battle)")
    models, ia, ib, sa = _parse_battles(battles)
    if not models:
        return {}
    theta = _fit_log_strengths(_win_matrix(len(models), ia, ib, sa), prior)
    ratings = _to_elo(theta, scale, base, init_rating)
    return dict(sorted(zip(models, ratings.tolist()), key=lambda kv: -kv[1]))


def bootstrap_bradley_terry(
    battles: Iterable,
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    prior: float = 1.0,
    anchor: str | None = None,
) -> dict[str, RatingInterval]:
    """Point ratings (fit on all battles) with percentile bootstrap intervals; best first.

    With ``anchor`` (a model) every fit puts that model at ``init_rating`` instead of the
    mean there, so the intervals are those of each model's distance to the anchor (how
    Arena-Hard states ratings against its baseline).

    Each round resamples the battles with replacement and refits. Battles are first grouped
    into distinct (a, b, outcome) cells, so a round is one multinomial draw over at most
    3k^2 cells instead of touching every battle.
    """
    _check_bootstrap(confidence, rounds, prior=prior)
    models, ia, ib, sa = _parse_battles(battles)
    if not models:
        return {}
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is in no battle")
    k, n = len(models), len(sa)
    at = models.index(anchor) if anchor is not None else None
    point = _anchored(_to_elo(_fit_log_strengths(_win_matrix(k, ia, ib, sa), prior), scale, base, init_rating),
                      at, init_rating)
    # Identical battles form one cell; resampling n battles = a multinomial draw over cells.
    cells, counts = np.unique(np.stack([ia, ib, sa * 2]), axis=1, return_counts=True)
    ca, cb, cs = cells[0].astype(np.int64), cells[1].astype(np.int64), cells[2] / 2
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, k))
    for r in range(rounds):
        weights = rng.multinomial(n, counts / n).astype(float)
        theta = _fit_log_strengths(_win_matrix(k, ca, cb, cs, weights), prior)
        samples[r] = _anchored(_to_elo(theta, scale, base, init_rating), at, init_rating)
    alpha = (1.0 - confidence) / 2.0
    lower = np.quantile(samples, alpha, axis=0)
    upper = np.quantile(samples, 1.0 - alpha, axis=0)
    result = {
        m: RatingInterval(float(point[i]), float(lower[i]), float(upper[i])) for i, m in enumerate(models)
    }
    return dict(sorted(result.items(), key=lambda kv: -kv[1].rating))


def online_elo(
    battles: Iterable,
    *,
    k: float = 4.0,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
) -> dict[str, float]:
    """Classic sequential Elo updates in battle order (order-dependent; for live display)."""
    ratings: dict[str, float] = {}
    models, ia, ib, sa = _parse_battles(battles)
    r = np.full(len(models), init_rating)
    for a, b, s in zip(ia.tolist(), ib.tolist(), sa.tolist()):
        expected_a = 1.0 / (1.0 + base ** ((r[b] - r[a]) / scale))
        r[a] += k * (s - expected_a)
        r[b] -= k * (s - expected_a)
    ratings = dict(zip(models, r.tolist()))
    return dict(sorted(ratings.items(), key=lambda kv: -kv[1]))


def expected_win_rate(ratings: Mapping[str, float], *, scale: float = SCALE, base: float = BASE) -> dict:
    """Predicted P(row beats column) for every pair of rated models."""
    names: Sequence[str] = list(ratings)
    return {
        a: {b: 1.0 / (1.0 + base ** ((ratings[b] - ratings[a]) / scale)) for b in names if b != a} for a in names
    }


# ---------------------------------------------------------------- style control

# The style of an answer that FastChat's style-controlled leaderboard (and Arena-Hard's
# --style-control) holds fixed: its length in tokens and its markdown elements.
STYLE_FEATURES = ("tokens", "headers", "lists", "bold")

_TOKEN = re.compile(r"\w+|[^\w\s]")
_HEADER = re.compile(r"^#{1,6}\s+\S", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free length that tracks BPE token counts
    closely enough for a length covariate (and is the same for every model's answers)."""
    return len(_TOKEN.findall(text))


def style_of(texts: str | Iterable[str]) -> dict[str, int]:
    """Token count and markdown header / list item / bold counts, summed over the texts
    (one answer, or every assistant turn of a conversation). Code blocks are not markdown:
    a ``# comment`` or ``- x`` inside a fence counts as tokens only, as in FastChat."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = dict.fromkeys(STYLE_FEATURES, 0)
    for text in texts:
        out["tokens"] += count_tokens(text)
        prose = _FENCE.sub("", text)
        out["headers"] += len(_HEADER.findall(prose))
        out["lists"] += len(_LIST_ITEM.findall(prose))
        out["bold"] += len(_BOLD.findall(prose))
    return out


def style_covariates(style_a: Sequence[Mapping[str, float]], style_b: Sequence[Mapping[str, float]]) -> np.ndarray:
    """n x 4 covariates as FastChat normalises them: per feature (a - b) / (a + b) (0 when
    both are 0), then standardised.

    FastChat standardises over its battles, whose sides are drawn at random, so their mean
    is ~0. Here battles may all be oriented one way (every game "model vs baseline"), and
    centring on that mean would charge a model for its opponents' style: so the mean and
    standard deviation are taken over the battles in both orientations (mean exactly 0, sd =
    root mean square). A battle's covariates then flip sign when its sides are swapped, and
    on randomly oriented battles this is FastChat's normalisation. A constant-0 column stays 0."""
    a = np.array([[float(s[f]) for f in STYLE_FEATURES] for s in style_a]).reshape(-1, len(STYLE_FEATURES))
    b = np.array([[float(s[f]) for f in STYLE_FEATURES] for s in style_b]).reshape(-1, len(STYLE_FEATURES))
    total = a + b
    diff = np.divide(a - b, total, out=np.zeros_like(total), where=total > 0)
    if len(diff) == 0:
        return diff
    scale = np.sqrt((diff ** 2).mean(axis=0))
    return np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)


@dataclass(frozen=True)
class StyleControlled:
    """Style-controlled ratings (best first) and the fitted style coefficients.

    ``coefficients[f]`` is on the Elo scale: the rating points an answer gains from being one
    standard deviation of the normalised feature ``f`` ahead of its opponent."""

    ratings: dict[str, RatingInterval]
    coefficients: dict[str, RatingInterval]


def _fit_style_bt(ia: np.ndarray, ib: np.ndarray, feats: np.ndarray, y: np.ndarray, w: np.ndarray, k: int,
                  reg: float, start: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-12) -> np.ndarray:
    """argmax sum_i w_i [y_i log s(z_i) + (1 - y_i) log s(-z_i)] - reg/2 |b|^2 by damped Newton,
    z_i = theta[a_i] - theta[b_i] + gamma . feats_i and b = (theta, gamma).

    This is L2 logistic regression on the design "+1 for a's column, -1 for b's, then the
    features" (what FastChat builds), but the gradient and Hessian are summed per model with
    bincount instead of through that n x (k + 4) matrix: O(n) per step instead of O(n k^2),
    which keeps a 1,000-round bootstrap over many models fast. The L2 term (FastChat's
    contextual BT uses one too) makes the problem strictly concave: it pins the ratings'
    free offset to mean 0 and keeps them finite when a model wins every battle. A tie is
    y = 1/2, as in the plain fit."""
    m = feats.shape[1]
    beta = np.zeros(k + m) if start is None else start.copy()
    cell = ia * k + ib

    def objective(b):
        z = b[ia] - b[ib] + feats @ b[k:]
        return -(w * (y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z))).sum() - 0.5 * reg * b @ b

    current = objective(beta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(beta[ia] - beta[ib] + feats @ beta[k:])))
        r, c = w * (y - p), w * p * (1 - p)
        grad = np.concatenate([np.bincount(ia, r, k) - np.bincount(ib, r, k), feats.T @ r]) - reg * beta
        pair = np.bincount(cell, c, k * k).reshape(k, k)
        hess = np.empty((k + m, k + m))
        hess[:k, :k] = np.diag(pair.sum(axis=0) + pair.sum(axis=1)) - pair - pair.T
        cf = feats * c[:, None]
        cross = np.stack([np.bincount(ia, cf[:, j], k) - np.bincount(ib, cf[:, j], k) for j in range(m)], axis=1)
        hess[:k, k:], hess[k:, :k], hess[k:, k:] = cross, cross.T, feats.T @ cf
        hess += reg * np.eye(k + m)
        step = np.linalg.solve(hess, grad)
        beta, current, moved = _damped_step(objective, beta, step, current)
        if moved < tol:
            break
    return beta


def bootstrap_style_controlled(
    battles: Iterable,
    style_a: Sequence[Mapping[str, float]],
    style_b: Sequence[Mapping[str, float]],
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    reg: float = 0.5,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    weights: Sequence[float] | None = None,
    anchor: str | None = None,
) -> StyleControlled:
    """Bradley-Terry with style covariates (FastChat's style control), with bootstrap intervals.

    ``P(a beats b) = sigmoid(theta_a - theta_b + gamma . x)`` where ``x`` are the battle's
    ``style_covariates``: the ratings say who wins between equally long, equally formatted
    answers. ``style_a[i]`` / ``style_b[i]`` are ``style_of`` the two sides of battle i.
    ``weights`` count a battle several times (Arena-Hard's strong verdicts). Each bootstrap
    round resamples the battles and refits (covariates normalised once, on all battles).
    ``anchor`` as in ``bootstrap_bradley_terry``: that model sits at ``init_rating`` in every fit.
    """
    _check_bootstrap(confidence, rounds, reg=reg)
    models, ia, ib, sa = _parse_battles(battles)
    if len(style_a) != len(sa) or len(style_b) != len(sa):
        raise ValueError(f"style_a and style_b need one entry per battle ({len(sa)}), got {len(style_a)} and "
                         f"{len(style_b)}")
    if not models:
        return StyleControlled({}, {})
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is in no battle")
    k, n = len(models), len(sa)
    feats = style_covariates(style_a, style_b)
    base_w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    to_points = scale / math.log(base)
    point = _fit_style_bt(ia, ib, feats, sa, base_w, k, reg)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, k + feats.shape[1]))
    for r in range(rounds):
        counts = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)
        samples[r] = _fit_style_bt(ia, ib, feats, sa, base_w * counts, k, reg, start=point, tol=1e-8)
    if anchor is not None:  # ratings relative to the anchor in every fit
        at = models.index(anchor)
        point[:k] -= point[at]
        samples[:, :k] -= samples[:, [at]]
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(samples, alpha, axis=0), np.quantile(samples, 1.0 - alpha, axis=0)

    def interval(i: int, offset: float) -> RatingInterval:
        return RatingInterval(float(point[i] * to_points + offset), float(lower[i] * to_points + offset),
                              float(upper[i] * to_points + offset))

    # The L2 term already centres theta on 0; the offset puts the mean on init_rating.
    offset = init_rating - (0.0 if anchor is not None else float(point[:k].mean() * to_points))
    ratings = {m: interval(i, offset) for i, m in enumerate(models)}
    coefs = {f: interval(k + j, 0.0) for j, f in enumerate(STYLE_FEATURES)}
    return StyleControlled(dict(sorted(ratings.items(), key=lambda kv: -kv[1].rating)), coefs)


def win_rate_vs(rating: float, opponent: float, *, scale: float = SCALE, base: float = BASE) -> float:
    """P(a model rated ``rating`` beats one rated ``opponent``) under Bradley-Terry."""
    return 1.0 / (1.0 + base ** ((opponent - rating) / scale))
