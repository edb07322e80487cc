"""Benchmark the arena's two hot paths, each against a baseline, in one run.

1. Battle latency: two tiny LLaMAs served by our engine in this process (LocalClient), both
   answer the same prompt greedily. Baseline: stream model A, then model B (a naive UI);
   FastChat-style lock-step (pull one piece from A, then one from B, ...); ours:
   ``merge_streams`` (both streams consumed as they produce). Time until both answers ended
   and until both sides show text, per battle.
2. Vote storage under concurrent sessions: 8 threads store battles (2 conversations + 1
   vote each). Baseline: one shared sqlite3 connection behind a lock, default rollback
   journal; ours: ``ArenaStore`` (WAL, synchronous=NORMAL, one connection per thread).

    .venv/bin/python benchmarks/web_arena.py [--battles 6] [--tokens 64] [--votes 100] [--quick] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from _bench import ROOT, parse_args, recording  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

from vicuna.serve.arena import SCHEMA, ArenaStore  # noqa: E402
from vicuna.serve.web import merge_streams  # noqa: E402


# ---------------------------------------------------------------------------- battle latency


async def sequential(client, models, messages, params):
    t0 = time.perf_counter()
    first = [None, None]
    for i, m in enumerate(models):
        async for _ in client.stream_chat(m, messages, **params):
            first[i] = first[i] or time.perf_counter() - t0
    return time.perf_counter() - t0, max(first)


async def lockstep(client, models, messages, params):
    """FastChat's arena loop: one piece from each side in turn until both are done."""
    t0 = time.perf_counter()
    first = [None, None]
    gens = [client.stream_chat(m, messages, **params) for m in models]
    live = [True, True]
    while any(live):
        for i, g in enumerate(gens):
            if not live[i]:
                continue
            try:
                await g.__anext__()
                first[i] = first[i] or time.perf_counter() - t0
            except StopAsyncIteration:
                live[i] = False
    return time.perf_counter() - t0, max(first)


async def merged(client, models, messages, params):
    t0 = time.perf_counter()
    first = [None, None]
    async for i, piece, err in merge_streams([client.stream_chat(m, messages, **params) for m in models]):
        if err:
            raise err
        if piece:
            first[i] = first[i] or time.perf_counter() - t0
    return time.perf_counter() - t0, max(first)


def bench_battles(n: int, tokens: int) -> list[tuple[str, float, float]]:
    from conftest import CORPUS

    from vicuna.serve.model_client import LocalClient
    from vicuna.serve.launch import ModelConfig, load_engines
    from vicuna.tiny import make_tiny_llama, save_model, train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=512)
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    models = []
    for seed, name in enumerate(("model-a", "model-b")):
        # a bit larger than the test models, so generation, not Python, dominates
        path = save_model(make_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=8, seed=seed), tok,
                          tmp / name)
        models.append(ModelConfig(model_path=str(path), model_name=name, device="cpu"))
    engines = load_engines(models)
    client = LocalClient(engines)
    models = list(engines)
    params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": tokens}
    ways = {"stream A, then B (baseline)": sequential, "lock-step, FastChat-style": lockstep,
            "`merge_streams` (ours)": merged}
    results = {k: [] for k in ways}

    async def run():
        for k in range(n + 1):  # the first round warms up and is not counted
            messages = [{"role": "user", "content": f"Question number {k}: what is the capital of France?"}]
            for name, way in ways.items():
                t = await way(client, models, messages, params)
                if k:
                    results[name].append(t)

    try:
        asyncio.run(run())
    finally:
        for e in engines.values():
            e.stop()
    return [(name, sum(t[0] for t in ts) / len(ts), sum(t[1] for t in ts) / len(ts)) for name, ts in results.items()]


# ---------------------------------------------------------------------------- vote storage


def store_battles(save, vote, thread: int, n: int) -> None:
    for i in range(n):
        ids = [f"{thread}-{i}-a", f"{thread}-{i}-b"]
        for cid, model in zip(ids, ("a", "b")):
            save(cid, model)
        vote(ids)


def bench_storage(votes: int, threads: int = 8) -> list[tuple[str, float]]:
    msgs = json.dumps([{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "hello " * 100}])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        # Baseline: one connection shared by all threads, behind a lock; default journal.
        conn = sqlite3.connect(Path(tmp) / "base.db", check_same_thread=False, isolation_level=None)
        conn.executescript(SCHEMA)
        lock = threading.Lock()

        def save(cid, model):
            with lock:
                conn.execute("INSERT INTO conversations (id, mode, model, messages, params, created, updated) "
                             "VALUES (?, 'battle', ?, ?, '{}', ?, ?)", (cid, model, msgs, time.time(), time.time()))

        def vote(ids):
            with lock:
                conn.execute("INSERT INTO votes (created, mode, anonymous, model_a, model_b, conv_a, conv_b, winner) "
                             "VALUES (?, 'battle', 1, 'a', 'b', ?, ?, 'tie')", (time.time(), *ids))

        out.append(("one shared `sqlite3` connection behind a lock, default rollback journal (baseline)",
                    run_threads(save, vote, votes, threads)))
        conn.close()

        store = ArenaStore(Path(tmp) / "ours.db", salt="bench")
        messages = json.loads(msgs)

        def save2(cid, model):
            store.save_conversation(cid, mode="battle", model=model, messages=messages)

        def vote2(ids):
            store.add_vote(mode="battle", model_a="a", model_b="b", conv_a=ids[0], conv_b=ids[1], winner="tie",
                           anonymous=True)

        out.append(("`ArenaStore`: WAL, `synchronous=NORMAL`, one connection per thread (ours)", run_threads(save2, vote2, votes, threads)))
        assert store.counts()["votes"] == votes * threads
        store.close()
    return out


def run_threads(save, vote, n: int, threads: int) -> float:
    ts = [threading.Thread(target=store_battles, args=(save, vote, t, n)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n * threads / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--battles", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--votes", type=int, default=100, help="battles stored per thread (8 threads)")
    args = parse_args(ap)
    if args.quick:
        args.battles, args.tokens, args.votes = 1, 8, 10
    import torch

    battles = bench_battles(args.battles, args.tokens)
    storage = bench_storage(args.votes)
    with recording("web_arena", args):
        print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads\n")
        base, base_first = battles[0][1], battles[0][2]
        print(f"Battle latency, mean of {args.battles} battles, {args.tokens} new tokens per side, greedy")
        print("| way | both answers done (s) | × baseline | text on both sides (s) | × baseline |")
        print("|---|---|---|---|---|")
        for name, total, first in battles:
            print(f"| {name} | {total:.3f} | {total / base:.2f} | {first:.3f} | {first / base_first:.2f} |")
        base = storage[0][1]
        print(f"\nVote storage, 8 threads × {args.votes} battles (2 conversations + 1 vote each)")
        print("| way | battles/s | × baseline |")
        print("|---|---|---|")
        for name, rate in storage:
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
