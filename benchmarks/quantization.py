"""`--quantization int8` against the float dtypes, quality and speed, in one run.

For each variant — float32, bfloat16, int8 (weights) with bfloat16 activations, int8 with float32
activations — it prints:
  ppl        held-out perplexity on docs/training.md (in the tree, prose the model never saw as such;
             --quick: its first 256 tokens, else 1,024 in 512-token windows), and its ratio to bfloat16's
             and float32's (the int8 target: within 2% of the same activations' float model)
  paris      whether the greedy answer to "What is the capital of France?" contains "Paris"
  tok/s      decode throughput through the HF engine and the OpenAI API in this process (official
             `openai` client, streaming, greedy) at c=1 and c=16 concurrent clients, and the ratio to bf16
  roofline   c × measured memory bandwidth ÷ the model's weight bytes (int8 projections + float
             embeddings/head), the memory-bound limit, and tok/s as a share of it

    .venv/bin/python benchmarks/quantization.py                 # default model (SmolLM2-135M-Instruct)
    .venv/bin/python benchmarks/quantization.py --quick         # well under a minute's decoding
    .venv/bin/python benchmarks/quantization.py --model-dir DIR --levels 1,4,16 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

import torch

from _bench import parse_args, recording  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "docs" / "training.md"
QUESTION = "What is the capital of France?"
VARIANTS = {  # name -> (dtype, quantization)
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8/bf16": ("bfloat16", "int8"),
    "int8/fp32": ("float32", "int8"),
}


def bandwidth_gbs() -> float:
    """Reading a 1 GiB float32 tensor, best of 5 (as benchmarks/serve_throughput.py measures it)."""
    x = torch.ones(256 * 1024 ** 2)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer once (tied weights once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def perplexity(model, tokenizer, text: str, tokens: int, window: int = 512) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window][None]
            if chunk.shape[1] < 2:
                break
            loss = model(chunk, labels=chunk).loss.float().item()
            nll += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def greedy_answer(lm, max_new_tokens: int = 24) -> str:
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return lm.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


async def _clients(base_url: str, model: str, concurrency: int, requests_each: int, max_tokens: int) -> float:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="none") as client:
        return await _drive(client, model, concurrency, requests_each, max_tokens)


async def _drive(client, model: str, concurrency: int, requests_each: int, max_tokens: int) -> float:

    async def one(i: int) -> int:
        n = 0
        for j in range(requests_each):
            stream = await client.chat.completions.create(
                model=model, stream=True, temperature=0, max_tokens=max_tokens,
                messages=[{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}.{j}."}])
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1  # one streamed delta per decoded token
        return n

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    return tokens / (time.perf_counter() - start)


def throughput(model_dir: str, dtype: str, quantization: str, levels: list[int], max_tokens: int,
               requests_each: int) -> dict[int, float]:
    from vicuna.serve.engine import EngineConfig
    from vicuna.serve.launch import ModelConfig, local_api

    config = ModelConfig(model_path=model_dir, device="cpu", dtype=dtype, quantization=quantization)
    with local_api(config, EngineConfig(kv_cache_memory="256MiB")) as (url, engines):
        name = next(iter(engines))
        asyncio.run(_clients(url, name, 1, 1, 4))  # warm-up
        return {c: asyncio.run(_clients(url, name, c, requests_each, max_tokens)) for c in levels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="Hugging Face model folder (default: the default model)")
    p.add_argument("--levels", default="1,16", help="concurrent clients to measure (default 1,16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default 128; --quick 16)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2; --quick 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)} (default all)")
    args = parse_args(p)  # --quick: bfloat16 and int8/bf16 only, 256 held-out tokens, 16-token answers, 1 request
    with recording("quantization", args):
        run(args)


def run(args) -> None:
    from vicuna.model import load_model, resolve_model_path

    model_dir = resolve_model_path(args.model_dir)
    levels = [int(c) for c in args.levels.split(",")]
    max_tokens, requests_each, tokens = (16, 1, 256) if args.quick else (args.max_tokens, args.requests, 1024)
    text = HELD_OUT.read_text()
    bw = bandwidth_gbs()
    print(f"model {Path(model_dir).name}; memory bandwidth {bw:.1f} GB/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; held-out text {HELD_OUT.relative_to(ROOT)} ({tokens} tokens)")
    rows = {}
    for name in (["bfloat16", "int8/bf16"] if args.quick else args.variants.split(",")):
        dtype, quantization = VARIANTS[name]
        lm = load_model(model_dir, device="cpu", dtype=dtype, quantization=quantization)
        row = {"bytes": weight_bytes(lm.model), "ppl": perplexity(lm.model, lm.tokenizer, text, tokens),
               "paris": "Paris" in greedy_answer(lm)}
        del lm
        row["tok/s"] = throughput(model_dir, dtype, quantization, levels, max_tokens, requests_each)
        rows[name] = row
        print(f"  measured {name}", file=sys.stderr, flush=True)
    ref = {"float32": rows.get("float32"), "bfloat16": rows.get("bfloat16")}
    head = "| variant | weights | ppl | /bf16 | /fp32 | paris |"
    for c in levels:
        head += f" c={c} tok/s | /bf16 | roofline | share |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, row in rows.items():
        line = f"| {name} | {row['bytes'] / 1e6:.0f} MB | {row['ppl']:.3f} |"
        for base in ("bfloat16", "float32"):
            line += f" {row['ppl'] / ref[base]['ppl']:.3f} |" if ref[base] else " - |"
        line += f" {'yes' if row['paris'] else 'NO'} |"
        for c in levels:
            tps, roof = row["tok/s"][c], c * bw * 1e9 / row["bytes"]
            vs = f"{tps / ref['bfloat16']['tok/s'][c]:.2f}" if ref["bfloat16"] else "-"
            line += f" {tps:.1f} | {vs} | {roof:.0f} | {tps / roof:.1%} |"
        print(line)
    same = {"int8/bf16": "bfloat16", "int8/fp32": "float32"}
    for name, base in same.items():
        if name in rows and base in rows:
            drift = rows[name]["ppl"] / rows[base]["ppl"] - 1
            print(f"{name}: perplexity {drift:+.2%} against {base} ({'within' if abs(drift) < 0.02 else 'OUTSIDE'} "
                  f"the 2% target)")


if __name__ == "__main__":
    main()
