"""Benchmark the HF engine's prefix cache and its many-LoRA serving, each against its baseline, in one run.

1. Multi-turn chat: an 8-turn conversation whose history reaches ~1,000 tokens; the time to first token
   of each turn, prefix cache on and off (issue 24's target: turn-8 TTFT <= 1.5x turn-1 with the cache).
2. A shared system prompt: 16 concurrent requests sharing a ~500-token system prompt; their time to first
   token, cache on and off (target: >= 2x sooner with the cache). The cache is warmed by one request first,
   as a server that has answered once is.
3. Four LoRA adapters on one base against the base alone: weights in memory and decode throughput of 16
   streams spread over the four adapters (mixed batches) and of 16 streams of the base.

    .venv/bin/python benchmarks/prefix_cache.py [--model-dir DIR] [--dtype auto] [--quick]

``--quick`` runs the tiny demo model with short prompts (a smoke run; its numbers mean little). The table
in docs/benchmarks.md comes from a full run on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vicuna.conversation import encode, render_prompt  # noqa: E402
from vicuna.generation import SamplingParams  # noqa: E402
from vicuna.model import load_model, resolve_model_path  # noqa: E402
from vicuna.serve.engine import EngineConfig, HFEngine  # noqa: E402

from _bench import parse_args, recording  # noqa: E402


def ids_of(loaded, messages):
    return encode(loaded.tokenizer, render_prompt(loaded.template, messages, loaded.tokenizer))


async def timed(engine, ids, tokens, adapter=None):
    """(time to first token, text, tokens) of one greedy stream."""
    t0, first, text, n = time.perf_counter(), None, "", 0
    async for d in engine.stream(ids, SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True),
                                 adapter=engine._adapter(adapter)):
        first = first or time.perf_counter() - t0
        text, n = text + d.text, d.completion_tokens
    return first, text, n


def chat_turns(model_dir, dtype, caching, turns, user_words, answer_tokens):
    loaded = load_model(model_dir, device="cpu", dtype=dtype)
    engine = HFEngine(loaded, EngineConfig(prefix_caching=caching, kv_cache_memory="512MiB")).start()
    msgs, ttfts, lengths = [], [], []
    try:
        for t in range(turns):
            msgs.append({"role": "user", "content": f"Turn {t}: " + "tell me more about the history of Rome " *
                         (user_words // 8)})
            ids = ids_of(loaded, msgs)
            first, text, _ = asyncio.run(timed(engine, ids, answer_tokens))
            msgs.append({"role": "assistant", "content": text})
            ttfts.append(first)
            lengths.append(len(ids))
    finally:
        engine.stop()
    return ttfts, lengths


def shared_system(model_dir, dtype, caching, streams, system_words, tokens):
    loaded = load_model(model_dir, device="cpu", dtype=dtype)
    engine = HFEngine(loaded, EngineConfig(prefix_caching=caching, kv_cache_memory="512MiB")).start()
    system = {"role": "system", "content": "You are a meticulous assistant. " * (system_words // 5)}
    prompts = [ids_of(loaded, [system, {"role": "user", "content": f"Question {i}: what is {i} squared?"}])
               for i in range(streams)]
    try:
        asyncio.run(timed(engine, prompts[0], 1))  # a server that has answered once

        async def burst():
            return await asyncio.gather(*(timed(engine, ids, tokens) for ids in prompts))

        out = asyncio.run(burst())
    finally:
        engine.stop()
    return [o[0] for o in out], len(prompts[0])


def make_adapters(model_dir, n, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                         init_lora_weights=False)).save_pretrained(Path(out) / f"a{i}")
        paths[f"a{i}"] = str(Path(out) / f"a{i}")
    return paths


def lora_throughput(model_dir, dtype, adapters, streams, tokens):
    loaded = load_model(model_dir, device="cpu", dtype=dtype)
    engine = HFEngine(loaded, EngineConfig(kv_cache_memory="512MiB"), adapters=adapters).start()
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    names = list(adapters) or [None]
    prompt = ids_of(loaded, [{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    try:
        asyncio.run(timed(engine, prompt, 2, names[0]))

        async def burst():
            t0 = time.perf_counter()
            out = await asyncio.gather(*(timed(engine, prompt, tokens, names[i % len(names)])
                                         for i in range(streams)))
            return sum(o[2] for o in out) / (time.perf_counter() - t0)

        rate = asyncio.run(burst())
    finally:
        engine.stop()
    return weights, rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="HF model directory (default: the default model)")
    ap.add_argument("--dtype", default="auto", help="as `vicuna serve --dtype` (default: auto)")
    args = parse_args(ap)  # --quick: the tiny demo model, short prompts
    with recording("prefix_cache", args):
        return run(args)


def run(args) -> int:
    model_dir = resolve_model_path("demo" if args.quick else args.model_dir)
    turns, user_words, answer = (3, 16, 8) if args.quick else (8, 48, 64)
    streams, system_words, tokens = (4, 60, 4) if args.quick else (16, 400, 16)
    n_adapters, lora_streams, lora_tokens = (2, 4, 8) if args.quick else (4, 16, 64)
    print(f"# {platform.machine()}, {Path(model_dir).name}, dtype {args.dtype}; {time.strftime('%Y-%m-%d')}")

    print("\n## Multi-turn chat: time to first token per turn (s)")
    on, lengths = chat_turns(model_dir, args.dtype, True, turns, user_words, answer)
    off, _ = chat_turns(model_dir, args.dtype, False, turns, user_words, answer)
    print("| turn | prompt tokens | cache off | cache on | off / on |")
    print("|---|---|---|---|---|")
    for t in range(turns):
        print(f"| {t + 1} | {lengths[t]} | {off[t]:.3f} | {on[t]:.3f} | {off[t] / on[t]:.2f}x |")
    print(f"turn {turns} / turn 1 TTFT: cache on {on[-1] / on[0]:.2f}x (target <= 1.5x), "
          f"cache off {off[-1] / off[0]:.2f}x")

    print(f"\n## {streams} concurrent requests sharing a system prompt: time to first token (s)")
    res = {}
    for caching in (False, True):
        res[caching], plen = shared_system(model_dir, args.dtype, caching, streams, system_words, tokens)
    print(f"prompt: {plen} tokens")
    print("| cache | mean | p50 | max |")
    print("|---|---|---|---|")
    for caching in (False, True):
        x = res[caching]
        print(f"| {'on' if caching else 'off'} | {statistics.mean(x):.3f} | {statistics.median(x):.3f} | "
              f"{max(x):.3f} |")
    print(f"mean TTFT off / on: {statistics.mean(res[False]) / statistics.mean(res[True]):.2f}x (target >= 2x)")

    print(f"\n## {n_adapters} LoRA adapters on one base vs the base alone ({lora_streams} streams, "
          f"{lora_tokens} tokens each)")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, n_adapters, tmp)
        base_w, base_rate = lora_throughput(model_dir, args.dtype, {}, lora_streams, lora_tokens)
        lora_w, lora_rate = lora_throughput(model_dir, args.dtype, adapters, lora_streams, lora_tokens)
    print("| served | weights in memory | tok/s | vs base |")
    print("|---|---|---|---|")
    print(f"| base alone | {base_w / 2**20:.1f} MiB | {base_rate:.1f} | 1.00x |")
    print(f"| base + {n_adapters} adapters, streams spread over them | {lora_w / 2**20:.1f} MiB "
          f"({lora_w / base_w:.2f}x) | {lora_rate:.1f} | {lora_rate / base_rate:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
