"""`eval report`: turn judgment records into scores, win rates, ratings and charts.

Definitions (what the numbers mean, so they can be checked by hand):

* A *comparison* is one question turn judged for one pair of models. With position swap
  it is made of two judgments (each model once in position 1). It is *complete* when all
  its judgments parsed; incomplete ones are counted, never scored.
* Winner of a comparison: the winner both orders agree on; if they disagree, a tie.
  ``pairwise-score`` scores are the mean of the two orders. In ``single`` mode, two models
  graded on the same turn form a comparison (higher score wins; no swap involved).
* Relative score of M vs the baseline B: sum of M's scores / sum of B's scores over their
  complete comparisons ("X% of ChatGPT").
* Win rate = wins / comparisons; adjusted win rate = (wins + ties / 2) / comparisons;
  length-controlled win rate: see ``length_controlled_win_rate``.
* Relative to R (``relative_to``): a model's relative score divided by R's, both against
  the baseline (the Vicuna blog's "% of ChatGPT" through Vicuna-13B).
* Judge tokens: the usage each judge call reported, summed; cost = tokens x given prices.
* Judge consistency = share of complete swapped comparisons whose two orders agree.
* Ratings: Bradley-Terry on the Elo scale from all complete comparisons, with bootstrap
  95% intervals (``vicuna.ratings``); style-controlled ratings add the answers' style
  covariates (token length, markdown headers, lists, bold) to the same fit, so they rank
  models as if their answers were equally long and equally formatted.
* Arena-Hard (mode ``pairwise-5``): every judgment is one game, as in Arena-Hard-Auto (the
  two orders are two games); a strong verdict (``>>``) counts ``strong_weight`` times (3);
  Bradley-Terry with the baseline held at 1000 in every bootstrap round; win rate vs the
  baseline = P(model beats baseline) at those ratings, raw and style-controlled.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import ratings as rt
from ..errors import EvalUsageError
from ..files import write_figure, write_json, write_text
from .records import read_log

log = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "results.json", "relative_scores.png", "categories.png")


def load_judgments(path: Path) -> list[dict]:
    """Judgment records, one per judgment_id (a final status beats an error, later beats earlier)."""
    path = Path(path)
    if not path.exists():
        raise EvalUsageError(f"judgments file {path} does not exist (run `vicuna eval judge` first)")
    best: dict[str, dict] = {}
    for n, rec in enumerate(read_log(path), 1):
        for key in ("judgment_id", "mode", "question_id", "turn", "model_a", "status"):
            if key not in rec:
                raise EvalUsageError(f"{path}: record {n} lacks {key!r}; is this a `vicuna eval judge` output?")
        k = rec["judgment_id"]
        if k not in best or rec["status"] != "error" or best[k]["status"] == "error":
            best[k] = rec
    if not best:
        raise EvalUsageError(f"{path}: no judgments")
    return list(best.values())


# ---------------------------------------------------------------- comparisons


def _lengths(rec: dict, a: str, b: str) -> dict[str, Any]:
    lengths = rec.get("answer_lengths") or {}
    styles = rec.get("answer_style") or {}
    out: dict[str, Any] = {"len_a": lengths[a], "len_b": lengths[b]} if a in lengths and b in lengths else {}
    if a in styles and b in styles:
        out.update(style_a=styles[a], style_b=styles[b])
    return out


def comparisons(records: list[dict], mode: str) -> tuple[list[dict], dict[str, int]]:
    """Combine judgments into comparisons; returns (complete comparisons, counters)."""
    stats = {"complete": 0, "incomplete": 0, "swapped": 0, "consistent": 0}
    comps: list[dict] = []
    if mode == "single":
        by_turn: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in records:
            by_turn[(r["question_id"], r["turn"])][r["model_a"]] = r
        for (qid, turn), per_model in by_turn.items():
            ok = {m: r for m, r in per_model.items() if r["status"] == "ok"}
            names = list(ok)
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    a, b = names[i], names[j]
                    sa, sb = ok[a]["result"]["score"], ok[b]["result"]["score"]
                    lengths = _lengths({"answer_lengths": {**(ok[a].get("answer_lengths") or {}),
                                                           **(ok[b].get("answer_lengths") or {})},
                                        "answer_style": {**(ok[a].get("answer_style") or {}),
                                                         **(ok[b].get("answer_style") or {})}}, a, b)
                    comps.append({"question_id": qid, "turn": turn, "category": ok[a]["category"], "model_a": a,
                                  "model_b": b, "score_a": sa, "score_b": sb,
                                  "winner": "model_a" if sa > sb else "model_b" if sb > sa else "tie", **lengths})
        stats["complete"] = len(comps)
        return comps, stats
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["question_id"], r["turn"], r["model_a"], r["model_b"])].append(r)
    for (qid, turn, a, b), recs in groups.items():
        if any(r["status"] != "ok" for r in recs):
            stats["incomplete"] += 1
            continue
        stats["complete"] += 1
        winners = [r["result"]["winner"] for r in recs]
        agree = len(set(winners)) == 1
        if len(recs) > 1:
            stats["swapped"] += 1
            stats["consistent"] += agree
        comp = {"question_id": qid, "turn": turn, "category": recs[0]["category"], "model_a": a, "model_b": b,
                "winner": winners[0] if agree else "tie", **_lengths(recs[0], a, b)}
        if mode == "pairwise-score":
            comp["score_a"] = sum(r["result"]["score_a"] for r in recs) / len(recs)
            comp["score_b"] = sum(r["result"]["score_b"] for r in recs) / len(recs)
        comps.append(comp)
    return comps, stats


def _flip(c: dict) -> dict:
    w = {"model_a": "model_b", "model_b": "model_a"}.get(c["winner"], c["winner"])
    out = {**c, "model_a": c["model_b"], "model_b": c["model_a"], "winner": w}
    for x, y in (("score_a", "score_b"), ("len_a", "len_b"), ("style_a", "style_b")):
        if x in c:
            out[x], out[y] = c[y], c[x]
    return out


def _pair_stats(comps: Iterable[dict]) -> dict[str, Any]:
    comps = list(comps)
    n = len(comps)
    wins = sum(c["winner"] == "model_a" for c in comps)
    losses = sum(c["winner"] == "model_b" for c in comps)
    ties = n - wins - losses
    out: dict[str, Any] = {"comparisons": n, "wins": wins, "ties": ties, "losses": losses,
                           "win_rate": wins / n if n else None, "win_rate_adjusted": (wins + ties / 2) / n if n else None,
                           "win_rate_length_controlled": length_controlled_win_rate(comps)}
    if comps and "score_a" in comps[0]:
        total_a = sum(c["score_a"] for c in comps)
        total_b = sum(c["score_b"] for c in comps)
        out.update(total_score=total_a, baseline_total=total_b, relative_score=total_a / total_b if total_b else None)
    return out


def length_controlled_win_rate(comps: list[dict], ridge: float = 1e-4) -> float | None:
    """Win rate of model_a had both answers been equally long (AlpacaEval 2's idea).

    Fits P(model_a preferred) = sigmoid(theta + phi * tanh(dlen / sd(dlen))) by maximum
    likelihood (wins 1, ties 0.5, losses 0; dlen = characters of model_a's answer minus
    model_b's) and predicts at dlen = 0: sigmoid(theta). AlpacaEval 2 also has a question
    difficulty term fitted on its fixed question set and gamed baselines; we have neither.
    A tiny ridge keeps theta finite when one model wins everything. Needs two comparisons
    with recorded lengths.
    """
    import numpy as np

    rows = [c for c in comps if "len_a" in c]
    if len(rows) < 2:
        return None
    y = np.array([{"model_a": 1.0, "model_b": 0.0}.get(c["winner"], 0.5) for c in rows])
    d = np.array([c["len_a"] - c["len_b"] for c in rows], dtype=float)
    sd = d.std(ddof=1)
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.column_stack([np.ones_like(x), x])
    w = np.zeros(2)
    for _ in range(100):  # Newton's method on a strictly concave log-likelihood
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (y - p) - ridge * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


# ---------------------------------------------------------------- the report


def compute_report(records: list[dict], *, baseline: str | None = None, relative_to: str | None = None,
                   prices: tuple[float, float] | None = None, bootstrap_rounds: int = 1000,
                   seed: int = 0, strong_weight: int = 3) -> dict[str, Any]:
    """Every number of the report; ``prices`` = USD per million (prompt, completion) judge tokens;
    ``strong_weight`` = how many games a strong five-level verdict counts as."""
    if int(strong_weight) != strong_weight or strong_weight < 1:
        raise EvalUsageError(f"--strong-weight must be a whole number >= 1 (Arena-Hard: 3), got {strong_weight}")
    modes = {r["mode"] for r in records}
    if len(modes) != 1:
        raise EvalUsageError(f"judgments mix modes {sorted(modes)}; report one mode at a time")
    mode = modes.pop()
    models = sorted({r["model_a"] for r in records} | {r["model_b"] for r in records if r.get("model_b")})
    if baseline is None:  # the judge run's --baseline, recorded in every judgment
        recorded = {r.get("baseline") for r in records} - {None}
        baseline = recorded.pop() if len(recorded) == 1 else None
    if baseline is None and mode != "single":
        # Two models (or judgments made elsewhere with a baseline) put one model in model_b everywhere.
        bs = {r["model_b"] for r in records}
        baseline = bs.pop() if len(bs) == 1 else None
    if baseline is not None and baseline not in models:
        raise EvalUsageError(f"--baseline {baseline!r} is not among the judged models ({', '.join(models)})")
    if relative_to is not None and (relative_to not in models or not baseline or mode in ("pairwise", "pairwise-5")):
        raise EvalUsageError(f"--relative-to {relative_to!r} needs scores (not --mode pairwise), a baseline, and one of "
                             f"the judged models ({', '.join(models)})")

    comps, cstats = comparisons(records, mode)
    # Orient every comparison that involves the baseline as (model, baseline).
    comps = [_flip(c) if baseline and c["model_a"] == baseline else c for c in comps]

    judgments = {s: sum(r["status"] == s for r in records) for s in ("ok", "unparsed", "error")}
    judgments["total"] = len(records)
    judge = {
        **cstats,
        "consistency_rate": cstats["consistent"] / cstats["swapped"] if cstats["swapped"] else None,
    }

    battles = [(c["model_a"], c["model_b"], c["winner"]) for c in comps]
    intervals = rt.bootstrap_bradley_terry(battles, rounds=bootstrap_rounds, seed=seed) if battles else {}
    styled = bool(comps) and all("style_a" in c for c in comps)
    style_ctrl = (rt.bootstrap_style_controlled(battles, [c["style_a"] for c in comps], [c["style_b"] for c in comps],
                                                rounds=bootstrap_rounds, seed=seed) if styled else None)

    per_model: dict[str, dict[str, Any]] = {}
    for m in models:
        involved = [r for r in records if m in (r["model_a"], r.get("model_b"))]
        row: dict[str, Any] = {
            "judgments": len(involved),
            "unparsed": sum(r["status"] == "unparsed" for r in involved),
            "errors": sum(r["status"] == "error" for r in involved),
        }
        if m in intervals:
            iv = intervals[m]
            row.update(rating=iv.rating, rating_lower=iv.lower, rating_upper=iv.upper)
        if style_ctrl and m in style_ctrl.ratings:
            iv = style_ctrl.ratings[m]
            row.update(style_controlled_rating=iv.rating, style_controlled_lower=iv.lower,
                       style_controlled_upper=iv.upper)
        row.update(_model_stats(records, comps, mode, m, baseline))
        per_model[m] = row

    pairs = []
    for a, b in sorted({(c["model_a"], c["model_b"]) for c in comps}):
        pairs.append({"model": a, "opponent": b, **_pair_stats(c for c in comps if (c["model_a"], c["model_b"]) == (a, b))})

    categories: dict[str, dict[str, Any]] = {}
    for cat in sorted({r["category"] for r in records}):
        cat_records = [r for r in records if r["category"] == cat]
        cat_comps = [c for c in comps if c["category"] == cat]
        categories[cat] = {m: _model_stats(cat_records, cat_comps, mode, m, baseline) for m in models}

    if relative_to:
        _chain_relative_scores(per_model, baseline, relative_to)

    return {
        "mode": mode,
        "protocols": sorted({r.get("protocol") for r in records if r.get("protocol")}),
        "baseline": baseline,
        "relative_to": relative_to,
        "judge_models": sorted({r.get("judge_model") for r in records if r.get("judge_model")}),
        "prompt_versions": sorted({r.get("prompt_version") for r in records if r.get("prompt_version")}),
        "judgments": judgments,
        "judge": judge,
        "judge_tokens": judge_tokens(records, prices),
        "models": dict(sorted(per_model.items(), key=lambda kv: -(kv[1].get("rating") or float("-inf")))),
        "pairs": pairs,
        "categories": categories,
        "style_coefficients": ({f: iv.as_dict() for f, iv in style_ctrl.coefficients.items()} if style_ctrl else None),
        "arena_hard": (arena_hard(records, baseline, strong_weight=int(strong_weight), rounds=bootstrap_rounds, seed=seed)
                       if mode == "pairwise-5" and baseline else None),
    }


VERDICT_NAMES = ("much better", "better", "tie", "worse", "much worse")  # the model vs the baseline


def arena_hard(records: list[dict], baseline: str, *, strong_weight: int = 3, rounds: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """Arena-Hard-Auto's numbers: the five-level tally and BT win rates vs the baseline.

    Each judgment is a game (both orders are two games); a strong verdict is counted
    ``strong_weight`` times (Arena-Hard adds it that many times to the battles), so the
    bootstrap resamples those weighted games, as Arena-Hard's does.
    """
    games, style_a, style_b = [], [], []
    tally: dict[str, dict[str, int]] = {}
    for r in records:
        a, b = r["model_a"], r.get("model_b")
        if b is None:
            continue
        if a == baseline:  # orient as (model, baseline)
            a, b = b, a
            flip = True
        else:
            flip = False
        if b != baseline:
            continue
        t = tally.setdefault(a, {**dict.fromkeys(VERDICT_NAMES, 0), "unparsed": 0, "error": 0})
        if r["status"] != "ok":
            t[r["status"]] += 1
            continue
        res = r["result"]
        winner = {"model_a": "model_b", "model_b": "model_a"}.get(res["winner"], "tie") if flip else res["winner"]
        strong = bool(res.get("strong"))
        name = ("tie" if winner == "tie" else
                ("much better" if strong else "better") if winner == "model_a" else ("much worse" if strong else "worse"))
        t[name] += 1
        styles = r.get("answer_style") or {}
        for _ in range(strong_weight if strong else 1):
            games.append((a, b, winner))
            if a in styles and b in styles:
                style_a.append(styles[a])
                style_b.append(styles[b])
    out: dict[str, Any] = {"baseline": baseline, "strong_weight": strong_weight, "games": len(games), "models": {}}
    if not games:
        return out
    raw = rt.bootstrap_bradley_terry(games, rounds=rounds, seed=seed, anchor=baseline)
    sc = (rt.bootstrap_style_controlled(games, style_a, style_b, rounds=rounds, seed=seed, anchor=baseline)
          if len(style_a) == len(games) else None)

    def rates(iv: rt.RatingInterval) -> dict[str, float]:
        base = rt.INIT_RATING
        return {"rating": iv.rating, "rating_lower": iv.lower, "rating_upper": iv.upper,
                "win_rate": rt.win_rate_vs(iv.rating, base), "win_rate_lower": rt.win_rate_vs(iv.lower, base),
                "win_rate_upper": rt.win_rate_vs(iv.upper, base)}

    for m in sorted(tally, key=lambda m: -(raw[m].rating if m in raw else float("-inf"))):
        row: dict[str, Any] = {"verdicts": tally[m]}
        if m in raw:
            row.update(rates(raw[m]))
        if sc and m in sc.ratings:
            row["style_controlled"] = rates(sc.ratings[m])
        out["models"][m] = row
    if sc:
        out["style_coefficients"] = {f: iv.as_dict() for f, iv in sc.coefficients.items()}
    return out


def _chain_relative_scores(per_model: dict[str, dict], baseline: str, ref: str) -> None:
    """Each model's score as a share of ``ref``'s, through the common baseline.

    The Vicuna blog judged every model against Vicuna-13B only, then stated all of them as a
    share of ChatGPT: (LLaMA / Vicuna) / (ChatGPT / Vicuna) = 68%. Same here.
    """
    ref_ratio = 1.0 if ref == baseline else per_model[ref].get("relative_score")
    for m, row in per_model.items():
        ratio = 1.0 if m == baseline else row.get("relative_score")
        row["relative_to_score"] = ratio / ref_ratio if ratio is not None and ref_ratio else None


def judge_tokens(records: list[dict], prices: tuple[float, float] | None) -> dict[str, Any]:
    """Tokens the judge reported per call, summed; cost when prices (USD per 1M tokens) are given."""
    used = [r["usage"] for r in records if r.get("usage")]
    out: dict[str, Any] = {
        "calls": sum(r["status"] != "error" for r in records),
        "calls_with_usage": len(used),
        "prompt_tokens": sum(u["prompt_tokens"] for u in used),
        "completion_tokens": sum(u["completion_tokens"] for u in used),
    }
    if prices:
        out["price_per_million"] = {"prompt": prices[0], "completion": prices[1]}
        out["cost"] = (out["prompt_tokens"] * prices[0] + out["completion_tokens"] * prices[1]) / 1e6
    return out


def _model_stats(records: list[dict], comps: list[dict], mode: str, m: str, baseline: str | None) -> dict[str, Any]:
    """Head-to-head numbers vs the baseline (or vs everyone without one) plus per-turn scores."""
    row: dict[str, Any] = {}
    if baseline and m != baseline:
        row.update(_pair_stats(c for c in comps if c["model_a"] == m and c["model_b"] == baseline))
    elif not baseline and mode != "single":
        row.update(_pair_stats([c for c in comps if c["model_a"] == m] + [_flip(c) for c in comps if c["model_b"] == m]))
    row.update(_turn_scores(records, comps, mode, m))
    return row


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _turn_scores(records: list[dict], comps: list[dict], mode: str, model: str) -> dict[str, Any]:
    """Average score per turn (MT-bench style) and overall, where the mode has scores."""
    by_turn: dict[int, list[float]] = defaultdict(list)
    if mode == "single":
        for r in records:
            if r["model_a"] == model and r["status"] == "ok":
                by_turn[r["turn"]].append(r["result"]["score"])
    elif mode == "pairwise-score":
        for c in comps:
            if c["model_a"] == model:
                by_turn[c["turn"]].append(c["score_a"])
            elif c["model_b"] == model:
                by_turn[c["turn"]].append(c["score_b"])
    else:
        return {}
    out: dict[str, Any] = {"avg_score": _mean([s for v in by_turn.values() for s in v]),
                           "avg_score_turn": {str(t): _mean(v) for t, v in sorted(by_turn.items())}}
    if mode == "single":
        out["score_sum"] = sum(s for v in by_turn.values() for s in v)
    return out


# ---------------------------------------------------------------- writing


def _fmt(x, pct: bool = False, digits: int = 2) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(res: dict[str, Any]) -> str:
    mode, baseline, ref = res["mode"], res["baseline"], res.get("relative_to")
    j, judge, tok = res["judgments"], res["judge"], res["judge_tokens"]
    protocols = ", ".join(res.get("protocols") or []) or "–"
    lines = [
        "# Evaluation report",
        "",
        f"- mode: `{mode}`; protocol: {protocols}; judge: {', '.join(res['judge_models']) or '–'}; "
        f"prompts: {', '.join(res['prompt_versions']) or '–'}",
        f"- baseline: {baseline or '–'}",
        f"- judgments: {j['total']} (ok {j['ok']}, **unparsed {j['unparsed']}**, **failed {j['error']}**)",
        f"- comparisons: {judge['complete']} complete, {judge['incomplete']} incomplete (not scored)",
        f"- judge tokens: {tok['prompt_tokens']:,} prompt + {tok['completion_tokens']:,} completion over "
        f"{tok['calls_with_usage']} of {tok['calls']} calls that reported usage"
        + (f"; cost ${tok['cost']:.4f} at ${tok['price_per_million']['prompt']:g} / "
           f"${tok['price_per_million']['completion']:g} per 1M tokens" if "cost" in tok else ""),
    ]
    if mode != "single":
        lines.append(f"- judge position consistency: {_fmt(judge['consistency_rate'], pct=True)} "
                     f"({judge['consistent']} of {judge['swapped']} swapped comparisons agree)")
    if "mt-bench-single" in (res.get("protocols") or []):
        lines.append("- MT-bench score = avg score: the mean over every graded turn (FastChat's show_result.py)")
    lines += ["", "## Models", ""]
    scored = mode not in ("pairwise", "pairwise-5")
    sc = res.get("style_coefficients") is not None
    head = ["model", "rating (95% CI)"] + (["style-controlled (95% CI)"] if sc else [])
    if baseline:
        head += (["total", "baseline total", f"% of {baseline}"] if scored else [])
        head += [f"% of {ref}"] if ref else []
        head += ["W/T/L", "win rate", "adj. win rate", "LC win rate"]
    if scored:
        head += ["avg score", "avg turn 1", "avg turn 2"]
    head += ["unparsed", "failed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in res["models"].items():
        cells = [m, f"{_fmt(row.get('rating'), digits=0)} ({_fmt(row.get('rating_lower'), digits=0)}, "
                    f"{_fmt(row.get('rating_upper'), digits=0)})" if "rating" in row else "–"]
        if sc:
            cells.append(f"{_fmt(row.get('style_controlled_rating'), digits=0)} "
                         f"({_fmt(row.get('style_controlled_lower'), digits=0)}, "
                         f"{_fmt(row.get('style_controlled_upper'), digits=0)})" if "style_controlled_rating" in row
                         else "–")
        if baseline:
            if m == baseline:
                cells += (["–", "–", "(baseline)"] if scored else [])
            elif scored:
                cells += [_fmt(row.get("total_score")), _fmt(row.get("baseline_total")),
                          _fmt(row.get("relative_score"), pct=True)]
            cells += [_fmt(row.get("relative_to_score"), pct=True)] if ref else []
            if m == baseline:
                cells += ["–"] * 4
            else:
                cells += [f"{row.get('wins', 0)}/{row.get('ties', 0)}/{row.get('losses', 0)}",
                          _fmt(row.get("win_rate"), pct=True), _fmt(row.get("win_rate_adjusted"), pct=True),
                          _fmt(row.get("win_rate_length_controlled"), pct=True)]
        if scored:
            turns = row.get("avg_score_turn", {})
            cells += [_fmt(row.get("avg_score")), _fmt(turns.get("1")), _fmt(turns.get("2"))]
        cells += [str(row["unparsed"]), str(row["errors"])]
        lines.append("| " + " | ".join(cells) + " |")

    ah = res.get("arena_hard")
    if ah and ah["models"]:
        lines += ["", f"## Arena-Hard: win rate vs {ah['baseline']}", "",
                  f"{ah['games']} weighted games (each order one game; a strong verdict counts {ah['strong_weight']} "
                  f"times); Bradley-Terry with {ah['baseline']} at 1000, 95% bootstrap intervals. Style-controlled: "
                  "the same with token length and markdown headers/lists/bold as covariates.", "",
                  "| model | win rate (95% CI) | style-controlled win rate (95% CI) | rating | "
                  "much better / better / tie / worse / much worse | unparsed | failed |", "|---|---|---|---|---|---|---|"]
        for m, row in ah["models"].items():
            def wr(d):
                return (f"{_fmt(d['win_rate'], pct=True)} ({_fmt(d['win_rate_lower'], pct=True)}, "
                        f"{_fmt(d['win_rate_upper'], pct=True)})" if d and "win_rate" in d else "–")
            v = row["verdicts"]
            lines.append(f"| {m} | {wr(row)} | {wr(row.get('style_controlled'))} | {_fmt(row.get('rating'), digits=0)} | "
                         + " / ".join(str(v[n]) for n in VERDICT_NAMES) + f" | {v['unparsed']} | {v['error']} |")

    lines += ["", "## Pairs", "", "| model | opponent | comparisons | W/T/L | adj. win rate | LC win rate | total | "
              "opponent total | relative |", "|---|---|---|---|---|---|---|---|---|"]
    for p in res["pairs"]:
        lines.append(f"| {p['model']} | {p['opponent']} | {p['comparisons']} | {p['wins']}/{p['ties']}/{p['losses']} | "
                     f"{_fmt(p['win_rate_adjusted'], pct=True)} | {_fmt(p['win_rate_length_controlled'], pct=True)} | "
                     f"{_fmt(p.get('total_score'))} | {_fmt(p.get('baseline_total'))} | "
                     f"{_fmt(p.get('relative_score'), pct=True)} |")

    lines += ["", "## Categories", ""]
    metric, label = _category_metric(res)
    names = [m for m in res["models"] if not (baseline and m == baseline and metric != "avg_score")]
    lines += [f"{label}.", "", "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cat, rows in res["categories"].items():
        pct = metric != "avg_score"
        lines.append(f"| {cat} | " + " | ".join(_fmt(rows[m].get(metric), pct=pct) for m in names) + " |")
    # Every per-category number, one row per (category, model).
    head = ["category", "model", "comparisons", "W/T/L", "adj. win rate"]
    if scored:
        head += ["total", "opponent total", "relative", "avg score", "avg turn 1", "avg turn 2"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat, rows in res["categories"].items():
        for m, row in rows.items():
            if "comparisons" not in row and "avg_score" not in row:
                continue
            cells = [cat, m, _fmt(row.get("comparisons")),
                     f"{row['wins']}/{row['ties']}/{row['losses']}" if "wins" in row else "–",
                     _fmt(row.get("win_rate_adjusted"), pct=True)]
            if scored:
                turns = row.get("avg_score_turn", {})
                cells += [_fmt(row.get("total_score")), _fmt(row.get("baseline_total")),
                          _fmt(row.get("relative_score"), pct=True), _fmt(row.get("avg_score")),
                          _fmt(turns.get("1")), _fmt(turns.get("2"))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Charts: `relative_scores.png`, `categories.png`. Definitions: see `vicuna eval report --help`.", ""]
    return "\n".join(lines)


def _category_metric(res: dict[str, Any]) -> tuple[str, str]:
    if res["baseline"] and res["mode"] not in ("pairwise", "pairwise-5"):
        return "relative_score", f"Relative score vs {res['baseline']} (sum of scores / baseline's sum)"
    if res["mode"] == "single":
        return "avg_score", "Average score (1-10)"
    return "win_rate_adjusted", "Adjusted win rate (wins + ties/2)" + (f" vs {res['baseline']}" if res["baseline"] else "")


def write_charts(res: dict[str, Any], out_dir: Path) -> list[str]:
    """Bar chart of the headline metric per model, grouped bars per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric, label = _category_metric(res)
    baseline = res["baseline"]
    names = [m for m in res["models"] if not (baseline and m == baseline and metric != "avg_score")]
    written = []
    values = [res["models"][m].get(metric) for m in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    scale = 1 if metric == "avg_score" else 100
    bars = ax.bar(names, [(v or 0) * scale for v in values], color="#4C72B0")
    for bar, v in zip(bars, values):
        if v is not None:
            ax.annotate(f"{v * scale:.1f}" + ("" if metric == "avg_score" else "%"),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if metric == "relative_score":
        ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(label if len(label) < 40 else label.split(" (")[0])
    ax.set_title(label, fontsize=9)
    fig.tight_layout()
    write_figure(out_dir / "relative_scores.png", fig, dpi=120)
    plt.close(fig)
    written.append("relative_scores.png")

    cats = list(res["categories"])
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.35 * len(cats) * max(1, len(names)) + 3)), 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(cats))
    for i, m in enumerate(names):
        vals = [(res["categories"][c][m].get(metric) or 0) * scale for c in cats]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=m)
    if metric == "relative_score":
        ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("%" if scale == 100 else "score")
    ax.set_xticks(x, cats, rotation=30, ha="right")
    ax.set_title(label + " per category", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(out_dir / "categories.png", fig, dpi=120)
    plt.close(fig)
    written.append("categories.png")
    return written


def write_report(judgments: Path, out_dir: Path, *, baseline: str | None = None, relative_to: str | None = None,
                 prices: tuple[float, float] | None = None, force: bool = False, bootstrap_rounds: int = 1000,
                 charts: bool = True, strong_weight: int = 3) -> dict[str, Any]:
    out_dir = Path(out_dir)
    existing = [f for f in REPORT_FILES if (out_dir / f).exists()]
    if existing and not force:
        raise EvalUsageError(f"{out_dir} already holds a report ({', '.join(existing)}); use --force to replace it")
    res = compute_report(load_judgments(judgments), baseline=baseline, relative_to=relative_to, prices=prices,
                         bootstrap_rounds=bootstrap_rounds, strong_weight=strong_weight)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", res)
    write_text(out_dir / "report.md", render_markdown(res))
    if charts:
        write_charts(res, out_dir)
    return res
