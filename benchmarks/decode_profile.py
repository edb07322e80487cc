"""Where a decode step of the HF engine goes, at batch 1 and 16: a breakdown table.

It serves the model in this process (the same path as `vicuna serve`), sends C concurrent streaming
greedy requests of a short prompt and --max-tokens answers through the official `openai` client, and
times the engine's work with wall-clock timers wrapped around (for this run only) the pieces of the
model's forward; eager CPU operators are synchronous, so the timers are exact. (torch.profiler does not
see the engine's own thread.) Buckets, per decode step:

  weights     every linear layer (nn.Linear and the int8 layers, lm_head included): reading the weights;
              shown beside the floor, the weight bytes ÷ the measured memory bandwidth
  attention   the attention kernel (SDPA) and the paged KV cache's writes and gathers
  other ops   the rest of the forward: embeddings, norms, activations, rotary, residual adds
  outside     the step's wall time outside the model's forward: sampling, the scheduler, Python, and this
              process's HTTP/streaming glue

Per step = the bucket's time ÷ the decode steps (C rows share one step; a short prompt keeps prefill to
one step per request, counted in). Timings are only meaningful on an idle machine.

    .venv/bin/python benchmarks/decode_profile.py                      # default model, bf16 (--dtype auto)
    .venv/bin/python benchmarks/decode_profile.py --quick              # 16 tokens, seconds
    .venv/bin/python benchmarks/decode_profile.py --dtype float32 --quantization int8 --batches 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import time

import torch

from _bench import parse_args, recording  # noqa: E402

BUCKETS = ("weights", "attention", "other ops", "outside")
SPENT: collections.Counter = collections.Counter()  # seconds per timer


def timed(key: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[key] += time.perf_counter() - t
    return wrapper


def install_timers(model) -> None:
    """Wrap the linear layers, the attention function, the KV cache's update and the whole forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vicuna.quantize import Int8Linear
    from vicuna.serve.engine.kv import PagedKVCache

    torch.nn.Linear.forward = timed("weights", torch.nn.Linear.forward)
    Int8Linear.forward = timed("weights", Int8Linear.forward)
    PagedKVCache.update = timed("attention", PagedKVCache.update)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = timed("attention", ALL_ATTENTION_FUNCTIONS["sdpa"])
    model.forward = timed("forward", model.forward)


async def _requests(url: str, model: str, concurrency: int, max_tokens: int) -> int:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url, api_key="none") as client:
        async def one(i: int) -> int:
            n = 0
            stream = await client.chat.completions.create(
                model=model, stream=True, temperature=0, max_tokens=max_tokens,
                messages=[{"role": "user", "content": f"Tell a long story, number {i}."}])
            async for chunk in stream:
                n += bool(chunk.choices and chunk.choices[0].delta.content)
            return n

        return max(await asyncio.gather(*(one(i) for i in range(concurrency))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="Hugging Face model folder (default: the default model)")
    p.add_argument("--dtype", default="auto", help="--dtype of the served model (default auto)")
    p.add_argument("--quantization", default="none", help="--quantization of the served model (default none)")
    p.add_argument("--batches", default="1,16", help="concurrent requests = decode batch sizes (default 1,16)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64; --quick 16)")
    args = parse_args(p)  # --quick: 16-token answers
    with recording("decode_profile", args):
        run(args)


def run(args) -> None:
    from vicuna.model import resolve_model_path
    from vicuna.serve.engine import EngineConfig
    from vicuna.serve.launch import ModelConfig, local_api

    max_tokens = 16 if args.quick else args.max_tokens
    x = torch.ones(64 * 1024 ** 2)  # 256 MiB of float32
    x.sum()
    t = time.perf_counter()
    x.sum()
    bandwidth = x.numel() * 4 / (time.perf_counter() - t)
    del x
    config = ModelConfig(model_path=resolve_model_path(args.model_dir), device="cpu", dtype=args.dtype,
                         quantization=args.quantization)
    with local_api(config, EngineConfig(kv_cache_memory="256MiB")) as (url, engines):
        name, engine = next(iter(engines.items()))
        model = engine.model
        seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        weight_bytes = sum(t.numel() * t.element_size() for t in seen.values())
        install_timers(model)
        asyncio.run(_requests(url, name, 1, 4))  # warm-up
        print(f"{name}, dtype {args.dtype}, quantization {args.quantization}: {weight_bytes / 1e6:.0f} MB of "
              f"weights, memory bandwidth {bandwidth / 1e9:.1f} GB/s -> {weight_bytes / bandwidth * 1e3:.1f} ms "
              f"per step to read them; {torch.get_num_threads()} threads")
        print("| batch | ms/step | " + " | ".join(BUCKETS) + " |\n|---|---|" + "---|" * len(BUCKETS))
        for batch in [int(b) for b in args.batches.split(",")]:
            SPENT.clear()
            start = time.perf_counter()
            steps = asyncio.run(_requests(url, name, batch, max_tokens)) + 1  # + the prefill step
            wall = time.perf_counter() - start
            parts = {"weights": SPENT["weights"], "attention": SPENT["attention"],
                     "other ops": max(SPENT["forward"] - SPENT["weights"] - SPENT["attention"], 0.0),
                     "outside": max(wall - SPENT["forward"], 0.0)}
            cells = " | ".join(f"{parts[b] / steps * 1e3:.2f} ms ({parts[b] / wall:.0%})" for b in BUCKETS)
            print(f"| {batch} | {wall / steps * 1e3:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
