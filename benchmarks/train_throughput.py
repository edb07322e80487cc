"""Training throughput: pad-to-max-length vs dynamic padding vs packing, side by side.

One run trains the same small LLaMA on the same samples (a ShareGPT-like,
long-tailed length distribution) three ways and prints real (non-pad) tokens/s,
the share of computed tokens that are real, and the ratio to padding every
sample to --max-length (what the reference FastChat recipe does).

    .venv/bin/python benchmarks/train_throughput.py              # defaults below
    .venv/bin/python benchmarks/train_throughput.py --max-length 2048 --num-samples 256
    .venv/bin/python benchmarks/train_throughput.py --threads 2 --record   # an idle machine: keep the table
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import time

import torch
from _bench import parse_args, recording

from vicuna.conversation import IGNORE_INDEX
from vicuna.train.dataset import Sample, collate, pack_best_fit, plan_epoch
from vicuna.train.trainer import Dist, accumulate_gradients

PAD_TO_MAX = "pad-to-max"  # the baseline: every sample alone in a row padded to --max-length (not a trainer mode)


def sharegpt_like_lengths(n: int, max_length: int, seed: int) -> list[int]:
    """Log-normal lengths (median ~190, mean ~300 tokens, long tail), truncated at max_length like training does."""
    rng = random.Random(seed)
    return [max(16, min(max_length, int(rng.lognormvariate(5.25, 0.9)))) for _ in range(n)]


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(8, vocab) for _ in range(n)]
        cut = n // 3  # first third is the prompt, the rest the answer
        out.append(Sample(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


def pad_to(batch: dict, width: int, pad_id: int = 0) -> dict:
    """The baseline's padding: a collated (unpacked) batch widened to ``width`` tokens per row."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    rows = batch["input_ids"].shape[0]
    fill = lambda value: torch.full((rows, extra), value, dtype=torch.long)  # noqa: E731
    start = batch["position_ids"][:, -1:] + 1
    out = dict(batch, computed_tokens=rows * width)
    out["input_ids"] = torch.cat([batch["input_ids"], fill(pad_id)], 1)
    out["targets"] = torch.cat([batch["targets"], fill(IGNORE_INDEX)], 1)
    out["position_ids"] = torch.cat([batch["position_ids"], start + torch.arange(extra)], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], fill(0)], 1)
    return out


def run_mode(mode: str, samples, model, max_length: int, micro_batch: int) -> dict:
    rows = pack_best_fit([len(s) for s in samples], max_length) if mode == "packing" else None
    # the baseline's batches: any grouping gives the same work once every row is padded to max_length
    plan = plan_epoch(samples, "dynamic" if mode == PAD_TO_MAX else mode, micro_batch, epoch=0, seed=0,
                      packed_rows=rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    d = Dist(device=torch.device("cpu"))
    real = computed = 0
    t0 = time.perf_counter()
    for mb in plan:
        b = collate(samples, mb, pad_id=0, packed=mode == "packing")
        if mode == PAD_TO_MAX:
            b = pad_to(b, max_length)
        accumulate_gradients(model, [b], d)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += b["real_tokens"]
        computed += b["computed_tokens"]
    el = time.perf_counter() - t0
    return {"mode": mode, "seconds": el, "real": real, "computed": computed, "tok_s": real / el,
            "share": real / computed, "micro_batches": len(plan)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=96)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch in every mode")
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared 2-core machine use 1: two OpenMP threads "
                         "competing with other jobs ran 10-50x slower here")
    args = parse_args(ap)
    if args.quick:
        args.num_samples, args.max_length, args.hidden_size, args.num_layers = 12, 256, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    lengths = sharegpt_like_lengths(args.num_samples, args.max_length, args.seed)
    samples = make_samples(lengths, args.vocab, args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
                         num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.max_length, use_cache=False)
    config._attn_implementation = "sdpa"
    results = []
    for mode in (PAD_TO_MAX, "dynamic", "packing"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).train()
        results.append(run_mode(mode, samples, model, args.max_length, args.micro_batch))
    base = results[0]["tok_s"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with recording("train_throughput", args):
        print(f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"LLaMA {params:.1f}M params (hidden {args.hidden_size}, {args.num_layers} layers), {args.num_samples} "
              f"samples, mean {sum(lengths) / len(lengths):.0f} / max {max(lengths)} tokens, --max-length "
              f"{args.max_length}, {args.micro_batch} rows per micro-batch\n")
        names = {PAD_TO_MAX: "(a) pad to `--max-length` (baseline)",
                 "dynamic": "(b) dynamic padding, length-grouped (`--no-packing`)",
                 "packing": "(c) packing, best-fit decreasing (default)"}
        print("| batching | micro-batches | real tokens/s | real share of computed tokens | × (a) |")
        print("|---|---:|---:|---:|---:|")
        for r in results:
            print(f"| {names[r['mode']]} | {r['micro_batches']} | {r['tok_s']:,.0f} | {r['share']:.1%} | "
                  f"{r['tok_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
