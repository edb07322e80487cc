"""Evaluation benchmarks, side by side in one run.

1. Judging throughput: `run_judge` against a scripted OpenAI-compatible judge on 127.0.0.1
   that takes --latency seconds per call (a remote judge is latency-bound, not CPU-bound),
   sequential (baseline) vs --parallel N.
2. Bradley-Terry fitting: our damped Newton on the k x k win matrix (vicuna.ratings) vs the
   classic minorise-maximise iteration (Hunter 2004; baseline), and the bootstrap cost.

    .venv/bin/python benchmarks/eval_judge.py [--latency 0.05] [--questions 40] [--quick] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import ROOT, parse_args, recording  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

from test_eval_fakes import Reply, ScriptedServer  # noqa: E402  (the tests' scripted server)

from vicuna import ratings  # noqa: E402
from vicuna.eval.openai_client import Endpoint  # noqa: E402
from vicuna.eval.records import Question  # noqa: E402
from vicuna.eval.judge import run_judge  # noqa: E402


def judge_throughput(latency: float, n_questions: int, parallel: int) -> float:
    questions = [Question(i, "writing", [f"Question {i}?"]) for i in range(n_questions)]
    with tempfile.TemporaryDirectory() as d, ScriptedServer(lambda body, n: Reply(delay=latency, text="8 6\nok")) as s:
        for m in ("a", "b"):
            rows = [{"question_id": q.question_id, "choices": [{"turns": [f"{m} answer {q.question_id}"]}]}
                    for q in questions]
            Path(d, f"{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        t0 = time.perf_counter()
        counts = run_judge(questions, Path(d), ["a", "b"], Endpoint(s.base_url, "j"), Path(d, "j.jsonl"),
                           mode="pairwise-score", parallel=parallel)
        elapsed = time.perf_counter() - t0
    assert counts["ok"] == 2 * n_questions
    return counts["ok"] / elapsed


def mm_bradley_terry(wins: np.ndarray, iters: int = 10_000, tol: float = 1e-10) -> tuple[np.ndarray, int]:
    """Hunter's MM updates p_i <- W_i / sum_j n_ij / (p_i + p_j): the textbook baseline."""
    games = wins + wins.T
    w = wins.sum(axis=1)
    p = np.ones(len(w))
    for it in range(1, iters + 1):
        new = w / (games / (p[:, None] + p[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            return new, it
        p = new
    return p, iters


def synthetic(n: int, k: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    truth = np.linspace(1300, 700, k)
    out = []
    for _ in range(n):
        a, b = rng.choice(k, 2, replace=False)
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        u = rng.random()
        out.append((f"m{a}", f"m{b}", "model_a" if u < p - 0.05 else "tie" if u < p + 0.05 else "model_b"))
    return out


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.05, help="scripted judge latency per call, seconds")
    ap.add_argument("--questions", type=int, default=40, help="questions (x2 judge calls each, both orders)")
    args = parse_args(ap)
    sizes, rounds = ((2_000, 5), (20_000, 20), (100_000, 60)), 1000
    if args.quick:
        args.latency, args.questions, sizes, rounds = 0.01, 4, ((2_000, 5),), 20
    with recording("eval_judge", args):
        run(args, sizes, rounds)


def run(args, sizes, rounds: int) -> None:
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, python "
          f"{platform.python_version()}")

    print(f"\nJudging: {2 * args.questions} calls, {args.latency * 1000:.0f} ms judge latency")
    print("| `--parallel` | judgments/s | × baseline |\n|---|---|---|")
    base = None
    for par in (1, 4, 16):
        rate = judge_throughput(args.latency, args.questions, par)
        base = base or rate
        print(f"| {par}{' (baseline)' if par == 1 else ''} | {rate:.1f} | {rate / base:.2f} |")

    print("\nBradley-Terry fit, best of 5")
    print("| battles, models | MM (baseline) | Newton (ours) | speed-up | max rating diff |\n|---|---|---|---|---|")
    for n, k in sizes:
        battles = synthetic(n, k)
        models, ia, ib, sa = ratings._parse_battles(battles)
        wins = ratings._win_matrix(len(models), ia, ib, sa)
        t_mm = best_of(lambda: mm_bradley_terry(wins))
        p_mm, iters = mm_bradley_terry(wins)
        t_newton = best_of(lambda: ratings._fit_log_strengths(wins, prior=1e-9))
        theta = ratings._fit_log_strengths(wins, prior=1e-9)
        diff = np.max(np.abs(ratings._to_elo(theta, 400, 10, 1000) - ratings._to_elo(np.log(p_mm), 400, 10, 1000)))
        print(f"| {n:,}, {k} | {t_mm * 1000:.2f} ms ({iters} it) | {t_newton * 1000:.2f} ms | "
              f"{t_mm / t_newton:.1f}× | {diff:.3f} |")
    battles = synthetic(20_000, 20)
    t0 = time.perf_counter()
    ratings.bootstrap_bradley_terry(battles, rounds=rounds)
    print(f"\n`bootstrap_bradley_terry`, {rounds:,} rounds, 20,000 battles, 20 models: "
          f"{time.perf_counter() - t0:.2f} s (incl. parsing)")


if __name__ == "__main__":
    main()
