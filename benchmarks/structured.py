"""Structured outputs: JSON-Schema-constrained vs unconstrained decoding throughput, side by side in one run.

One in-process HF engine (the default real model unless --model) serves the same prompts at concurrency 1 and
--concurrency (default 16), first free, then constrained to a JSON Schema (nested object, enum, integer
range, array), and prints generated tok/s of each, the ratio constrained/free, and the time spent filling and
applying token masks per decode step (the cost the grammar adds; the target is a ratio >= 0.8).

    .venv/bin/python benchmarks/structured.py            # the default model, 64 tokens per answer
    .venv/bin/python benchmarks/structured.py --quick    # a smoke run: c=1 and c=4, 16 tokens, well under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _bench import parse_args, recording  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "species": {"type": "string", "enum": ["cat", "dog", "bird", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                  "required": ["name", "city"]},
        "tricks": {"type": "array", "items": {"type": "string", "maxLength": 30}},
    },
    "required": ["name", "species", "age", "owner", "tricks"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the default real model)")
    ap.add_argument("--dtype", default="auto", help="auto / float32 / bfloat16 (default: auto, as vicuna serve)")
    ap.add_argument("--concurrency", type=int, default=16, help="the second concurrency level (default 16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    args = parse_args(ap)  # --quick: c=1 and c=4, 16 tokens
    with recording("structured", args):
        run(args)


def run(args) -> None:
    if args.quick:
        args.concurrency, args.max_tokens = 4, 16

    from vicuna.model import load_model
    from vicuna.serve import structured
    from vicuna.serve.core import GenerateRequest
    from vicuna.serve.engine import EngineConfig, HFEngine
    from vicuna.weights.gguf import ensure_default_model

    loaded = load_model(args.model or ensure_default_model(), device="cpu", dtype=args.dtype)
    engine = HFEngine(loaded, EngineConfig(max_batch_size=max(16, args.concurrency), kv_cache_memory="512MiB")).start()
    constraint = structured.constraint("json_schema", SCHEMA, "guided_json")
    engine.grammars.compile(constraint)  # compiled once, as a cached schema is in serving

    def request(i: int, constrained: bool) -> GenerateRequest:
        return GenerateRequest(messages=[{"role": "user", "content": f"Describe pet number {i} as JSON."}],
                               max_tokens=args.max_tokens, temperature=0.7, seed=i,
                               constraint=constraint if constrained else None)

    async def run(c: int, constrained: bool) -> tuple[float, int, float, int]:
        async def one(i):
            n = 0
            async for d in engine.generate(request(i, constrained)):
                n = d.completion_tokens
            return n

        s0 = engine.stats()
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
        wall = time.perf_counter() - t0
        s1 = engine.stats()
        return wall, tokens, s1.mask_seconds - s0.mask_seconds, s1.mask_steps - s0.mask_steps

    try:
        asyncio.run(run(1, True))  # warm-up
        rows = []
        for c in (1, args.concurrency):
            free_wall, free_tok, _, _ = asyncio.run(run(c, False))
            con_wall, con_tok, mask_s, mask_steps = asyncio.run(run(c, True))
            free_rate, con_rate = free_tok / free_wall, con_tok / con_wall
            rows.append((c, free_rate, con_rate, con_rate / free_rate, 1000 * mask_s / max(1, mask_steps), con_tok))
    finally:
        engine.stop()
    print(f"model {loaded.name}, dtype {str(next(loaded.model.parameters()).dtype).removeprefix('torch.')}, "
          f"{args.max_tokens} tokens per answer at most")
    print("| c | free tok/s | json tok/s | ratio | mask ms/step | json tokens |\n|---|---|---|---|---|---|")
    for c, free, con, ratio, mask_ms, n in rows:
        print(f"| {c} | {free:.1f} | {con:.1f} | {ratio:.2f} | {mask_ms:.3f} | {n} |")


if __name__ == "__main__":
    main()
