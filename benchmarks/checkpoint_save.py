"""Checkpoint save and load: sharded DCP checkpoints (ours) vs one torch.save of the full state, side by side.

One process saves the training state of a real model (fp32 weights + AdamW moments; SmolLM2-135M: 1.6 GB) a few
ways and prints seconds, GB/s and the ratio to ``torch.save`` of the whole state in one file:

- our checkpoint, written in the foreground (what a SIGTERM save does);
- our checkpoint, written in the background (``--async-save``): how long training is blocked (staging a copy),
  and how long until the checkpoint is complete;
- loading it back (resume), and ``vicuna weights consolidate`` of it into a Hugging Face folder.

Each figure is the best of --repeat interleaved runs, under --dir (put it on the disk you care about).

    .venv/bin/python benchmarks/checkpoint_save.py                       # the default real model
    .venv/bin/python benchmarks/checkpoint_save.py --model DIR --dir /mnt/nvme/tmp --repeat 3
    .venv/bin/python benchmarks/checkpoint_save.py --repeat 3 --record   # an idle machine: keep the table
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _bench import parse_args, recording

from vicuna.train.checkpoint import Checkpointer, consolidate
from vicuna.train.distributed import Dist


def state_bytes(model, optimizer) -> int:
    moments = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values())
    return sum(p.numel() * p.element_size() for p in model.parameters()) + moments


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the default real model)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=2)
    args = parse_args(ap)
    from transformers import AutoModelForCausalLM

    from vicuna.weights.gguf import ensure_default_model

    if args.quick:  # a tiny random LLaMA: the same code paths in seconds
        from vicuna.tiny import make_tiny_llama, train_bpe_tokenizer

        args.repeat = 1
        model = make_tiny_llama(train_bpe_tokenizer(["a tiny corpus for a tiny tokenizer"] * 8, vocab_size=300))
        path = Path("tiny-llama")
    else:
        path = Path(args.model) if args.model else ensure_default_model()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # one step, so the AdamW moments exist
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    size = state_bytes(model, optimizer)
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    d = Dist(device=torch.device("cpu"))
    ckpt = Checkpointer(root / "ours", model, optimizer, scheduler, d, lora=False, keep=1, background=True,
                        model_files=model.config.save_pretrained)

    def fresh() -> None:
        shutil.rmtree(root / "ours", ignore_errors=True)
        (root / "ours").mkdir()

    def torch_save() -> None:
        with open(root / "full.pt", "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    # interleaved, best of --repeat: the disk's write-back state (and, on a shared machine, the neighbours) move
    # every figure; what one method leaves dirty in the page cache slows the next
    times: dict[str, list[float]] = {k: [] for k in ("base", "fg", "blocked", "bg", "base_load", "load")}
    for _ in range(args.repeat):
        times["base"].append(timed(torch_save))
        fresh()
        times["fg"].append(timed(lambda: ckpt.save(1, {}, background=False)))
        fresh()
        t0 = time.perf_counter()
        ckpt.save(1, {}, background=True)
        times["blocked"].append(time.perf_counter() - t0)
        ckpt.finish()
        times["bg"].append(time.perf_counter() - t0)
        times["base_load"].append(timed(lambda: torch.load(root / "full.pt", weights_only=True)))
        times["load"].append(timed(lambda: ckpt.load(root / "ours" / "checkpoint-1")))
    rows = [(name, size, min(times[key])) for name, key in (
        ("`torch.save` of the full state (baseline)", "base"), ("our checkpoint, foreground (the SIGTERM save)", "fg"),
        ("our checkpoint, background: training blocked", "blocked"), ("our checkpoint, background: until complete", "bg"),
        ("`torch.load` of the full state (baseline resume)", "base_load"), ("our resume (load)", "load"))]
    out = root / "hf"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows.append(("consolidate to a Hugging Face folder (weights only)", weights,
                 timed(lambda: consolidate(root / "ours" / "checkpoint-1", out))))
    base = rows[0][2]
    with recording("checkpoint_save", args):
        print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
              f"state {size / 1e9:.2f} GB ({path.name}: fp32 weights + AdamW), best of {args.repeat}")
        print(f"| {path.name}, {size / 1e9:.2f} GB of state, one process | GB | seconds | GB/s | time vs `torch.save` |")
        print("|---|---|---|---|---|")
        for name, nbytes, sec in rows:
            print(f"| {name} | {nbytes / 1e9:.2f} | {sec:.2f} | {nbytes / 1e9 / sec:.2f} | {sec / base:.2f}× |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
