"""`vicuna train`: flags (or a YAML recipe plus flags) -> :func:`vicuna.train.trainer.train`."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Supervised fine-tuning on multi-turn conversations (loss on assistant outputs only),
or preference tuning (DPO, IPO, hinge) on prompt/chosen/rejected pairs.

Inputs:  --model-path BASE (a Hugging Face model dir) and --data-path DATA (.json list or
         .jsonl; ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
         or {"messages": [{"role", "content"}]}); or --config RECIPE.yaml, whose settings
         are the same names as the flags (flags given on the command line override it).
Output:  --output-dir OUT becomes a Hugging Face model dir (or a LoRA adapter with --lora)
         with the chat template embedded, generation_config.json eos ids set to the
         template's stop tokens and vicuna.json (template name, data and run summary);
         plus OUT/train_log.jsonl, OUT/loss.png and OUT/checkpoint-N/ (resumable).
Default: packing up to --max-length per row, cosine schedule, resume from the newest
         complete checkpoint in OUT. SIGTERM saves a checkpoint and exits with code 143.
Prefer:  --objective dpo (or ipo, hinge; --beta, default 0.1) trains on preference pairs
         instead: --data-path is then a JSONL of {"prompt", "chosen", "rejected"} (as
         `vicuna data pairs` writes); only the final answer is scored, the reference
         log-probs are the base model's (LoRA: adapter disabled), computed once up front;
         train_log.jsonl adds rewards_chosen, rewards_rejected, margin and accuracy.
Plan:    --dry-run prints the memory per rank (parameters, gradients, optimizer,
         activations with and without gradient checkpointing) from the model's config
         alone; --world-size N plans for N GPUs from any machine.

Examples:
  vicuna train --model-path ./llama-7b --data-path sharegpt.json --output-dir out/vicuna-7b
  vicuna train --config recipes/tiny-cpu.yaml --output-dir out/tiny --max-steps 50
  vicuna train --model-path out/vicuna-7b --data-path pairs.jsonl --output-dir out/dpo \
      --objective dpo --lora --beta 0.1 --learning-rate 5e-6
  torchrun --nproc_per_node 8 -m vicuna.train --config recipes/vicuna-7b.yaml \\
      --model-path ./llama-7b --data-path sharegpt.json --output-dir out/vicuna-7b
  vicuna train --config recipes/vicuna-13b.yaml --model-path ./llama-13b --dry-run --world-size 8
"""


def run(args: argparse.Namespace) -> int:
    from ..errors import TrainInputError
    from .config import config_from_args
    from .trainer import dry_run, train

    if args.world_size is not None and not args.dry_run:
        raise TrainInputError("--world-size only plans (with --dry-run); torchrun sets the real one")
    if args.dry_run:
        if args.world_size is not None and args.world_size < 1:
            raise TrainInputError("--world-size must be >= 1")
        print(dry_run(config_from_args(args, planning=True), args.world_size)[1])
        return 0
    train(config_from_args(args))
    return 0


def add_commands(sub) -> None:
    from ..commands import command
    from .config import add_arguments

    p = command(sub, "train", run, help="fine-tune a model on conversations (SFT, LoRA, FSDP) or preference pairs (DPO)",
                description=DESCRIPTION)
    add_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated memory per rank and exit (reads only the model's config)")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: plan for N ranks (default: torchrun's WORLD_SIZE, else 1)")
