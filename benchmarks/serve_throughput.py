"""Serving throughput: continuous batching vs one request at a time, same engine, same model.

Starts `vicuna serve` twice in a subprocess with a small random LLaMA (built
here, ~3.7M parameters) — once with --max-batch-size 64 (continuous batching)
and once with --max-batch-size 1 (how the reference worker behaves) — and
drives each with C concurrent streaming clients for C in --levels. Every
request asks for exactly --tokens tokens (ignore_eos), so both configurations
do identical work. Reports aggregate output tokens/s and time to first token
(p50/p99), plus the ratio batching / one-at-a-time.

    .venv/bin/python benchmarks/serve_throughput.py            # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/serve_throughput.py --levels 1,16 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CORPUS = [
    "Hello! How can I help you today? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Write a Python function that adds two numbers: def add(a, b): return a + b",
    "A chat between a curious user and an artificial intelligence assistant.",
    "1 2 3 4 5 6 7 8 9 10 numbers, punctuation; quotes \"like\" 'this' (and) [that] {too}",
] * 20
QUESTIONS = [
    "What is the capital of France?", "Write a function that adds two numbers.",
    "Tell me about the quick brown fox.", "How can you help me today?", "Count from one to ten.",
    "Why is the sky blue?", "Give me three tips for writing clean code.", "Summarise the last answer.",
]


def build_model(path: Path) -> Path:
    from vicuna.tiny import make_tiny_llama, save_model, train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=512)
    model = make_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=8, max_position_embeddings=1024)
    save_model(model, tok, path)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", file=sys.stderr)
    return path


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def drive(url: str, concurrency: int, requests: int, tokens: int) -> dict:
    """``concurrency`` clients issue ``requests`` streaming chat requests in total."""
    ttfts: list[float] = []
    out_tokens = 0
    todo = list(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal out_tokens
        while todo:
            i = todo.pop()
            body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            start, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        out_tokens += chunk["usage"]["completion_tokens"]
            ttfts.append(first if first is not None else time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"tok_s": out_tokens / wall, "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            "tokens": out_tokens, "wall": wall}


def serve(model_dir: Path, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vicuna", "serve", "--model-path", str(model_dir), "--model-name", "bench",
         "--port", str(port), "--device", "cpu", "--max-batch-size", str(max_batch), "--max-queue", "1024"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server failed:\n{proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start")
        time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--model-dir", default=None, help="serve this model instead of building the small one")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level and configuration; the best is kept")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    from vicuna.serve.server import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else build_model(Path(tmp) / "bench-model")
        configs = {"batching": 64, "one-at-a-time": 1}
        procs, urls = [], {}
        try:
            for label, max_batch in configs.items():
                port = free_port()
                procs.append(serve(model_dir, port, max_batch))
                urls[label] = f"http://127.0.0.1:{port}"
                asyncio.run(drive(urls[label], 2, 2, 8))  # warm-up
            # The machine is shared and noisy: alternate the two servers and keep each one's best run,
            # so both see the same background load.
            results: dict[str, dict[int, dict]] = {label: {} for label in configs}
            for c in levels:
                for rep in range(args.repeats):
                    for label in configs:
                        r = asyncio.run(drive(urls[label], c, max(8, c), args.tokens))
                        best = results[label].get(c)
                        if best is None or r["tok_s"] > best["tok_s"]:
                            results[label][c] = r
                        print(f"{label:>14} c={c:<3} run {rep + 1}: {r['tok_s']:7.0f} tok/s  ttft p50 "
                              f"{r['ttft_p50'] * 1e3:7.0f} ms  p99 {r['ttft_p99'] * 1e3:7.0f} ms", file=sys.stderr)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)

    import torch

    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__} "
          f"({platform.machine()}); {args.tokens} output tokens per request, greedy, streaming; "
          f"requests per level = max(8, concurrency); best of {args.repeats} alternating runs.\n")
    print("| concurrency | batching tok/s | one-at-a-time tok/s | ratio | TTFT p50 / p99 ms, batching "
          "| TTFT p50 / p99 ms, one-at-a-time |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        b, s = results["batching"][c], results["one-at-a-time"][c]
        print(f"| {c} | {b['tok_s']:.0f} | {s['tok_s']:.0f} | {b['tok_s'] / s['tok_s']:.1f}x "
              f"| {b['ttft_p50'] * 1e3:.0f} / {b['ttft_p99'] * 1e3:.0f} "
              f"| {s['ttft_p50'] * 1e3:.0f} / {s['ttft_p99'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
