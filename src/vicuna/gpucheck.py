"""The GPU verification pack: every CUDA path of the project, exercised in one run.

    python -m vicuna.gpucheck                 # on a GPU machine: every check, report in gpu-report.md
    python -m vicuna.gpucheck --dry           # on a CPU: the checks that can run there, the others SKIP
    python -m vicuna.gpucheck --list          # the checks, one per line
    python -m vicuna.gpucheck --only resume-fp32,fsdp-gloo

Each check is one function registered with ``@check(name, what)`` and runs the project's real
entry points (`vicuna train` in a subprocess, ``torchrun`` for FSDP, the engine,
``launch.local_api`` and the official openai client) on a tiny random LLaMA, and on the real
model when ``--real-model DIR`` is given. A check is PASS only when it ran what its row names
and every verdict held; it is SKIP, with the reason, when a prerequisite is missing (no GPU, a
single GPU for NCCL, no bitsandbytes/flash-attn/vLLM wheel), and FAIL when a verdict failed or
it raised. The report is markdown; the exit code is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .files import write_text

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CORPUS = ["Hello! How can I help you today? I am a helpful assistant.",
          "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
          "Write a Python function that adds two numbers: def add(a, b): return a + b",
          "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant."] * 30
QA = [("What is the capital of France?", "Paris is the capital of France."), ("Say hello.", "Hello! How are you?"),
      ("Add 2 and 3.", "2 + 3 = 5"), ("Name a color.", "Blue, like the sky."), ("Count to five.", "1 2 3 4 5")]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
LR = 3e-3  # every training run of the pack; the bf16 resume bound is in units of it


@dataclass
class Result:
    status: str = PASS
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        self.lines.append(text)

    def expect(self, ok: bool, text: str) -> bool:
        """Record a verdict; one false one fails the check (a FAIL is never undone)."""
        self.lines.append(("ok: " if ok else "FAILED: ") + text)
        if not ok:
            self.status = FAIL
        return ok

    def skip(self, why: str) -> "Result":
        """The check could not run what its row names: SKIP (a FAIL already recorded stays FAIL)."""
        self.lines.append("skipped: " + why)
        if self.status != FAIL:
            self.status = SKIP
        return self

    def finish(self) -> None:
        """A PASS must rest on at least one verdict: a check that checked nothing is a FAIL."""
        if self.status == PASS and not any(line.startswith("ok: ") for line in self.lines):
            self.expect(False, "the check recorded no verdict")


@dataclass
class Context:
    dry: bool
    device: str
    work: Path
    tiny: Path
    data: Path
    real: Path | None
    steps: int

    @property
    def models(self) -> list[tuple[str, Path]]:
        return [("tiny", self.tiny)] + ([("real", self.real)] if self.real else [])


@dataclass
class Check:
    name: str
    what: str
    run: Callable[[Context, Result], None]


CHECKS: list[Check] = []


def check(name: str, what: str) -> Callable:
    """Register a check: ``fn(ctx, result)`` records verdicts with ``result.expect`` or ``result.skip``."""
    def register(fn: Callable[[Context, Result], None]) -> Callable[[Context, Result], None]:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"two checks named {name}")
        CHECKS.append(Check(name, what, fn))
        return fn
    return register


def missing(module: str) -> str | None:
    """Why ``module`` cannot be imported here, or None."""
    try:
        __import__(module)
        return None
    except Exception as e:  # noqa: BLE001 - a broken wheel (wrong CUDA) raises more than ImportError
        return f"{module} is not importable here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


# ------------------------------------------------------------------------- running `vicuna`

# Wrong restores the resume checks use as negative controls: each leaves one piece of the training
# state at its fresh value after a checkpoint is loaded. A resume comparison that cannot tell these
# apart from a correct restore proves nothing.
WRONG_RESTORES = {
    "optimizer": "AdamW's moments dropped after loading (as if only the weights were restored)",
    "scheduler": "the learning-rate schedule left at step 0 after loading",
}


def _break_restore(kind: str) -> None:
    from vicuna.train import checkpoint

    load = checkpoint.Checkpointer.load

    def wrong_load(self, path):
        fresh_epoch, fresh_last = self.scheduler.last_epoch, list(self.scheduler.get_last_lr())
        state = load(self, path)
        if kind == "optimizer":
            self.optimizer.state.clear()
        else:
            self.scheduler.last_epoch, self.scheduler._last_lr = fresh_epoch, fresh_last
            for group, lr in zip(self.optimizer.param_groups, fresh_last):
                group["lr"] = lr
        return state

    checkpoint.Checkpointer.load = wrong_load


def run_vicuna(argv: list[str]) -> int:
    """``run-vicuna [--deterministic] [--wrong-restore KIND] -- ARGS``: `vicuna ARGS` (``vicuna.cli.main``),
    with deterministic kernels (so float32 reruns are bit-equal on CUDA too) or a deliberately wrong restore."""
    opts, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    if "--deterministic" in opts:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first call
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, for an op that has none
    for opt in opts:
        if opt.startswith("--wrong-restore="):
            _break_restore(opt.split("=", 1)[1])
    from .cli import main as vicuna_main

    return vicuna_main(rest)


def vicuna_cmd(*args, deterministic: bool = True, wrong_restore: str | None = None) -> list[str]:
    """The command line of `vicuna ARGS` (through :func:`run_vicuna`)."""
    opts = (["--deterministic"] if deterministic else []) + ([f"--wrong-restore={wrong_restore}"] if wrong_restore
                                                             else [])
    return ["-m", "vicuna.gpucheck", "run-vicuna", *opts, "--", *map(str, args)]


def vicuna(*args, env: dict | None = None, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """Run `python -m vicuna ARGS` (deterministic kernels) and return its result."""
    return subprocess.run([sys.executable, *vicuna_cmd(*args, **kw)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def torchrun(nproc: int, *args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *vicuna_cmd(*args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def tail(p: subprocess.CompletedProcess, n: int = 800) -> str:
    return "" if p.returncode == 0 else f" (exit {p.returncode}): {p.stderr[-n:]}"


def train_args(ctx: Context, model: Path, out: Path, *extra) -> list:
    return ["train", "--model-path", model, "--data-path", ctx.data, "--output-dir", out, "--max-length", 128,
            "--per-device-batch-size", 2, "--learning-rate", LR, "--seed", 7, "--save-total-limit", 5, *extra]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' weights (inf if their tensors differ in name or
    shape, or there are none); 0.0 means bit-equal."""
    wa, wb = weights(a), weights(b)
    if not wa or wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return float("inf")
    worst = 0.0
    for k in wa:
        if not (wa[k] == wb[k]).all():
            diff = float((wa[k].double() - wb[k].double()).abs().max())
            worst = max(worst, diff if diff == diff else float("inf"))  # NaN counts as different
    return worst


def bf16_resume_bound(steps_after_resume: int, lr: float = LR) -> float:
    """How far a *correct* bf16 resume may end from the uninterrupted run, per weight.

    The trainer keeps float32 master weights and AdamW state, and bf16 only in autocast compute. So
    a resume can differ only where a kernel is not bit-reproducible (the runs use deterministic
    algorithms, so usually nowhere). Such a kernel perturbs one bf16 rounding, 2^-8 relative, of an
    activation or gradient; AdamW's update lr*m/sqrt(v) is scale-free, so a relative gradient error
    e moves each update by at most about e*lr. Summed over the steps after the resume, that is
    steps*lr*2^-8; twice that is the bound. A wrong restore misses by a sizable share of lr per
    step (the negative controls in check resume-bf16 and tests/test_gpucheck.py show by how much).
    """
    return 2 * steps_after_resume * lr * 2 ** -8


# ------------------------------------------------------------------------- training: packing, flash-attention


def _qa_samples(lm):
    from vicuna.train.dataset import tokenize_dataset

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    return tokenize_dataset(convs, lm.tokenizer, lm.template, 128)


def sample_logits(path: Path, samples, pad: int, device: str, dtype, impl: str, packed: bool) -> list:
    """Each sample's logits (float32, on the CPU), from one packed row or one row per sample."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna.train.dataset import collate

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).to(device)
    rows = [list(range(len(samples)))] if packed else [[i] for i in range(len(samples))]
    out = []
    for row in rows:
        batch = collate(samples, [row], pad, packed=packed)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        with torch.no_grad():  # use_cache=False, as the trainer calls it: with the cache on, transformers does
            logits = model(**inputs, use_cache=False).logits[0].float().cpu()  # not split a packed row
        start = 0
        for i in row:
            out.append(logits[start:start + len(samples[i])])
            start += len(samples[i])
    del model
    return out


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@check("packing", "packed vs unpacked logits (SDPA, float32); `vicuna train --packing` tokens/s and MFU")
def check_packing(ctx: Context, r: Result) -> None:
    import torch

    from vicuna.model import load_model

    for label, path in ctx.models:
        lm = load_model(path, device="cpu", dtype="float32")
        samples, pad = _qa_samples(lm), lm.tokenizer.pad_token_id or 0
        packed, alone = (sample_logits(path, samples, pad, ctx.device, torch.float32, "sdpa", p) for p in (True, False))
        d, scale = max_diff(packed, alone), max(1.0, max(float(x.abs().max()) for x in alone))
        # float32: packing changes only which rows the kernels see, so logits agree to ~1e-6 of their size (CPU:
        # 2e-7 tiny, 8e-5 of logits up to ~30 real); a sample that attends across its boundary moves them by
        # orders of magnitude more (0.45 on the tiny model when transformers' packed mask is off)
        r.expect(d <= 1e-5 * scale, f"{label}: each sample's logits packed = alone (float32, SDPA; max |diff| "
                 f"{d:.2g}, logits up to {scale:.3g})")
    for label, path in ctx.models:
        out = ctx.work / f"packing-run-{label}"
        p = vicuna(*train_args(ctx, path, out, "--max-steps", ctx.steps, "--save-steps", 0, "--packing"))
        if r.expect(p.returncode == 0, f"{label}: vicuna train --packing ran {ctx.steps} steps" + tail(p)):
            last = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()][-1]
            memory = json.loads((out / "vicuna.json").read_text()).get("train", {}).get("memory", {})
            r.note(f"{label}, packed, {'bf16' if ctx.device == 'cuda' else 'fp32'} on {ctx.device}, last step: "
                   f"{last.get('tokens_per_s', '?')} tokens/s, MFU {last.get('mfu', '?')}; peak memory "
                   f"{memory.get('peak_gb_per_rank', '?')} GB ({memory.get('measured', '?')})")


@check("flash-attn", "flash-attention-2 varlen, packed and unpacked, as close to float32 as SDPA in bf16 is")
def check_flash_attn(ctx: Context, r: Result) -> None:
    if ctx.device != "cuda":
        r.skip("flash-attention 2 needs CUDA")
        return
    why = missing("flash_attn")
    if why:
        r.skip(why + "; carry a prebuilt flash-attn wheel (docs/gpu.md)")
        return
    flash_vs_sdpa(ctx, r, "flash_attention_2")


def flash_vs_sdpa(ctx: Context, r: Result, impl: str) -> None:
    """``impl`` in bf16, packed and unpacked, against float32 SDPA alone; allowed twice SDPA-bf16's own distance
    from float32 (bf16 rounding), while attention across a sample boundary moves logits far more."""
    import torch

    from vicuna.model import load_model

    for label, path in ctx.models:
        lm = load_model(path, device="cpu", dtype="float32")
        samples, pad = _qa_samples(lm), lm.tokenizer.pad_token_id or 0
        ref = sample_logits(path, samples, pad, ctx.device, torch.float32, "sdpa", False)
        floor = max_diff(sample_logits(path, samples, pad, ctx.device, torch.bfloat16, "sdpa", False), ref)
        for packed in (True, False):
            d = max_diff(sample_logits(path, samples, pad, ctx.device, torch.bfloat16, impl, packed), ref)
            r.expect(d <= 2 * floor + 1e-3, f"{label}: {impl} {'packed' if packed else 'unpacked'} (bf16) is "
                     f"{d:.3g} from float32 SDPA; SDPA in bf16 is {floor:.3g}")


# ------------------------------------------------------------------------- training: kill and resume


def _popen(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *vicuna_cmd(*args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# float32 runs name SDPA: flash-attention 2 has no float32 kernels, and its backward is not bit-reproducible
FP32_ATTN = ("--attn-implementation", "sdpa")


def kill_and_resume(ctx: Context, r: Result, label: str, path: Path, precision: str) -> tuple[Path, Path, Path] | None:
    """An uninterrupted run and one SIGKILLed after a mid-run checkpoint, then rerun to the end.

    Returns (uninterrupted output, resumed output, the checkpoint it resumed from), or None if a run failed.
    """
    steps = max(2, ctx.steps)
    every = max(1, steps // 4)
    mid_step = every * max(1, steps // every // 2)  # a checkpoint before the last step: the kill lands mid-run
    common = ("--max-steps", steps, "--save-steps", every, "--precision", precision, "--no-packing",
              *FP32_ATTN * (precision == "fp32"))
    ref, out = ctx.work / f"resume-{precision}-ref-{label}", ctx.work / f"resume-{precision}-{label}"
    p = vicuna(*train_args(ctx, path, ref, *common))
    if not r.expect(p.returncode == 0, f"{label}: {precision} full fine-tuning, {steps} steps uninterrupted"
                    + tail(p)):
        return None
    proc = _popen(train_args(ctx, path, out, *common, "--throttle", 0.5))
    mid = out / f"checkpoint-{mid_step}"
    reached = _wait_for(mid / "manifest.json", proc)  # written last: the checkpoint is complete
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not r.expect(reached and not (out / "vicuna.json").exists(),
                    f"{label}: SIGKILLed after {mid.name} was saved, before the end"):
        return None
    p = vicuna(*train_args(ctx, path, out, *common))
    if not r.expect(p.returncode == 0 and f"resumed from {mid}" in p.stderr,
                    f"{label}: the rerun resumed from {mid.name}" + tail(p)):
        return None
    return ref, out, mid


def resume_wrongly(ctx: Context, path: Path, ckpt: Path, precision: str, kind: str) -> tuple[Path, str]:
    """Resume a copy of ``ckpt`` with a deliberately wrong restore (see WRONG_RESTORES); returns its output."""
    out = ctx.work / f"wrong-{kind}-{precision}-{path.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.copytree(ckpt, out / ckpt.name)
    steps = max(2, ctx.steps)
    common = ("--max-steps", steps, "--save-steps", max(1, steps // 4), "--precision", precision, "--no-packing",
              *FP32_ATTN * (precision == "fp32"))
    p = vicuna(*train_args(ctx, path, out, *common), wrong_restore=kind)
    return out, "" if p.returncode == 0 and "resumed from" in p.stderr else tail(p) or ": did not resume"


@check("resume-fp32", "float32 full fine-tuning: SIGKILL mid-run, resume bit-equal to the uninterrupted run")
def check_resume_fp32(ctx: Context, r: Result) -> None:
    for label, path in ctx.models:
        runs = kill_and_resume(ctx, r, label, path, "fp32")
        if runs:
            d = weight_diff(runs[0], runs[1])
            # float32 weights, optimizer and schedule restored exactly + deterministic kernels: bit-equal
            r.expect(d == 0.0, f"{label}: resumed weights bit-equal to the uninterrupted run's (max |diff| {d:.3g})")


@check("resume-bf16", "bf16 full fine-tuning: SIGKILL mid-run, resume within the bf16 bound; wrong restores exceed it")
def check_resume_bf16(ctx: Context, r: Result) -> None:
    if ctx.dry:
        r.skip("dry mode: bf16 training is the GPU's precision; on CPU the same check, negative controls "
               "included, runs in tests/test_gpucheck.py::test_bf16_resume_check_catches_wrong_restores")
        return
    for label, path in ctx.models:
        runs = kill_and_resume(ctx, r, label, path, "bf16")
        if not runs:
            continue
        ref, out, ckpt = runs
        steps_after = max(2, ctx.steps) - int(ckpt.name.split("-")[1])
        bound = bf16_resume_bound(steps_after)
        d = weight_diff(ref, out)
        r.expect(d <= bound, f"{label}: resumed weights within {bound:.2g} of the uninterrupted run's "
                 f"(max |diff| {d:.3g}; {steps_after} steps after the resume at lr {LR})")
        if label != "tiny":
            continue
        for kind, what in WRONG_RESTORES.items():  # negative controls: the bound must catch a wrong restore
            bad, err = resume_wrongly(ctx, path, ckpt, "bf16", kind)
            if r.expect(not err, f"{label}: a run with a wrong restore ({what}) completed" + err):
                db = weight_diff(ref, bad)
                r.expect(db > bound, f"{label}: that wrong restore ends {db:.3g} away, beyond the bound {bound:.2g}")


# ------------------------------------------------------------------------- quantized: QLoRA, --load-8bit


def _needs_bitsandbytes(ctx: Context, r: Result) -> bool:
    if ctx.device != "cuda":
        r.skip("bitsandbytes' 4-/8-bit kernels need CUDA")
        return False
    why = missing("bitsandbytes")
    if why:
        r.skip(why + "; carry its wheel (scripts/gpu_wheels.py)")
        return False
    return True


@check("qlora", "QLoRA (`vicuna train --qlora`, 4-bit NF4 base): loss falls; the adapter loads with --lora and "
       "takes effect (the real model answers Paris)")
def check_qlora(ctx: Context, r: Result) -> None:
    if not _needs_bitsandbytes(ctx, r):
        return
    from vicuna.model import load_model

    steps = max(10, ctx.steps)
    for label, path in ctx.models:
        out = ctx.work / f"qlora-{label}"
        p = vicuna(*train_args(ctx, path, out, "--max-steps", steps, "--save-steps", 0, "--qlora", "--lora-r", 8))
        if not r.expect(p.returncode == 0 and (out / "adapter_model.safetensors").exists(),
                        f"{label}: {steps} QLoRA steps, adapter saved" + tail(p)):
            continue
        rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
        r.expect(rows[-1]["loss"] < rows[0]["loss"], f"{label}: loss fell from {rows[0]['loss']:.4f} to "
                 f"{rows[-1]['loss']:.4f}")
        lm = load_model(path, device="cuda", lora=out)
        if label == "tiny":  # its answers mean nothing: check the adapter is applied at all
            import torch

            base = load_model(path, device="cuda")
            ids = base.tokenizer(PROMPT[0]["content"], return_tensors="pt")["input_ids"].to(base.device)
            with torch.no_grad():
                delta = float((lm.model(ids).logits - base.model(ids).logits).abs().max())
            r.expect(delta > 1e-3, f"{label}: --lora {out.name} applies the adapter (logits move by {delta:.3g})")
        else:  # the QA set holds "Paris is the capital of France."
            text = _greedy(lm, PROMPT, 16)
            r.expect("Paris" in text, f"{label}: the base with the adapter (--lora) answers {text!r}")


def _greedy(lm, messages, max_new_tokens: int) -> str:
    import torch

    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        gen = lm.model.generate(**{k: v.to(device) for k, v in ids.items()}, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def agreement(ref, other, samples, pad: int) -> tuple[float, float, float]:
    """Teacher-forced top-1 on the trained (assistant) tokens of ``samples``: (accuracy of ``ref``, accuracy of
    ``other``, share of positions where both predict the same token)."""
    import torch

    from vicuna.train.dataset import IGNORE_INDEX, collate

    hits_ref = hits_other = same = total = 0
    for i in range(len(samples)):
        batch = collate(samples, [[i]], pad, packed=False)
        tgt = batch["targets"][0]
        mask = tgt != IGNORE_INDEX
        preds = []
        for model in (ref, other):
            device = next(model.parameters()).device
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
            with torch.no_grad():
                preds.append(model(**inputs, use_cache=False).logits[0].argmax(-1).cpu()[mask])
        want = tgt[mask]
        hits_ref += int((preds[0] == want).sum())
        hits_other += int((preds[1] == want).sum())
        same += int((preds[0] == preds[1]).sum())
        total += int(mask.sum())
    return hits_ref / total, hits_other / total, same / total


def load_with_flags(*flags) -> object:
    """A model loaded through the flags `vicuna chat/serve` take (``ModelConfig`` as flags, then
    ``launch.load_hf_model``): the project's own --load-8bit path, not transformers' directly."""
    from vicuna.serve.launch import ModelConfig, add_flags, from_flags, load_hf_model

    parser = argparse.ArgumentParser()
    add_flags(parser, ModelConfig, "model")
    return load_hf_model(from_flags(ModelConfig, parser.parse_args([str(f) for f in flags])))


def train_tiny(ctx: Context, steps: int) -> tuple[Path | None, str]:
    """The tiny model fine-tuned on the QA set (float32), so its predictions are confident enough to compare."""
    out = ctx.work / f"tiny-trained-{steps}"
    if (out / "vicuna.json").exists():
        return out, ""
    p = vicuna(*train_args(ctx, ctx.tiny, out, "--max-steps", steps, "--save-steps", 0, "--precision", "fp32",
                           "--learning-rate", 1e-2, "--no-packing", *FP32_ATTN))
    return (out, "") if p.returncode == 0 else (None, tail(p))


MIN_LEARNED = 0.75  # the tiny model must predict this share of its trained tokens, or agreeing would mean little


@check("load-8bit", "--load-8bit (bitsandbytes LLM.int8): agrees with bf16 on a trained tiny model; "
       "the real model answers Paris")
def check_load_8bit(ctx: Context, r: Result) -> None:
    if not _needs_bitsandbytes(ctx, r):
        return
    import torch

    r.note("--load-4bit: not a flag of this project (4-bit weights are QLoRA's, check qlora)")
    trained, err = train_tiny(ctx, 200)
    if not r.expect(trained is not None, "tiny: fine-tuned on the QA set to compare on" + err):
        return
    for label, path in [("tiny (trained)", trained)] + ([("real", ctx.real)] if ctx.real else []):
        ref = load_with_flags("--model-path", path, "--device", "cuda", "--dtype", "bfloat16")
        q8 = load_with_flags("--model-path", path, "--device", "cuda", "--load-8bit")
        r.expect(any("Linear8bitLt" in type(m).__name__ for m in q8.model.modules()),
                 f"{label}: --load-8bit gave bitsandbytes Linear8bitLt layers")
        samples = _qa_samples(ref)
        acc_ref, acc_q, same = agreement(ref.model, q8.model, samples, ref.tokenizer.pad_token_id or 0)
        if label.startswith("tiny"):
            r.expect(acc_ref >= MIN_LEARNED, f"{label}: bf16 predicts {acc_ref:.0%} of its trained tokens "
                     f"(>= {MIN_LEARNED:.0%}: it learned the set)")
            r.expect(same >= 0.9, f"{label}: 8-bit and bf16 predict the same next token at {same:.0%} of the "
                     f"trained positions (>= 90%); 8-bit accuracy {acc_q:.0%}")
        else:
            r.note(f"{label}: 8-bit and bf16 agree at {same:.0%} of the positions; accuracy {acc_q:.0%} vs "
                   f"{acc_ref:.0%}")
            answer = _greedy(q8, PROMPT, 24)
            r.expect("Paris" in answer, f"{label}: the 8-bit model answers {answer!r} (bf16: "
                     f"{_greedy(ref, PROMPT, 24)!r})")
        del ref, q8
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- serving: HF engine, vLLM


async def _stream(client, model: str, messages, max_tokens: int) -> tuple[str, int]:
    s = await client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    text, tokens = [], 0
    async for chunk in s:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


def throughput(base: str, model: str, concurrency: int, max_tokens: int) -> float:
    """Completion tokens per second with ``concurrency`` streams through the official client."""
    import openai

    async def run():
        c = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        prompts = [[{"role": "user", "content": f"Question {i}: tell me about the sea."}] for i in range(concurrency)]
        t = time.perf_counter()
        out = await asyncio.gather(*(_stream(c, model, p, max_tokens) for p in prompts))
        await c.close()
        return sum(n for _, n in out) / (time.perf_counter() - t)

    return asyncio.run(run())


def conformance(base: str, model: str, r: Result, label: str) -> None:
    """The API's core OpenAI semantics against a served model (the subset tests/test_serve.py pins)."""
    import openai

    c = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    full = c.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=12)
    chunks = list(c.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    r.expect(streamed == full.choices[0].message.content and chunks[-1].usage.completion_tokens
             == full.usage.completion_tokens, f"{label}: stream = non-stream, usage in the last chunk")
    two = c.chat.completions.create(model=model, messages=PROMPT, n=2, temperature=1.0, seed=3, max_tokens=8)
    r.expect([ch.index for ch in two.choices] == [0, 1], f"{label}: n=2 gives two choices")
    lp = c.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=3, logprobs=True,
                                   top_logprobs=2, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content if lp.choices[0].logprobs else []
    r.expect(len(content) == 3 and len(content[0].top_logprobs) == 2, f"{label}: logprobs with top_logprobs")
    text = full.choices[0].message.content
    if len(text) > 4:
        cut = c.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=12, stop=[text[2:4]])
        r.expect(cut.choices[0].message.content == text[:2] and cut.choices[0].finish_reason == "stop",
                 f"{label}: a stop string ends the answer before it")
    try:
        c.chat.completions.create(model=model, messages=PROMPT, max_tokens=10**7)
        r.expect(False, f"{label}: an over-long max_tokens is refused")
    except openai.BadRequestError as e:
        r.expect(e.code == "context_length_exceeded", f"{label}: over-long max_tokens -> 400 context_length_exceeded")


@check("hf-engine", "HF engine: batched greedy = alone (float32), API conformance, tok/s at c=1/16/64")
def check_hf_engine(ctx: Context, r: Result) -> None:
    from vicuna.serve.core import GenerateRequest
    from vicuna.serve.engine import EngineConfig
    from vicuna.serve.launch import ModelConfig, local_api

    levels = (1, 16, 64) if not ctx.dry else (1, 4)
    kv = "256MiB" if ctx.dry else "8GiB"  # ample for c=64 here; the GPU's default (90% of it) would stay reserved
    reqs = [GenerateRequest(messages=[{"role": "user", "content": f"Tell me {i} things " * (i % 4 + 1)}],
                            temperature=0, max_tokens=16) for i in range(8)]
    for label, path in ctx.models:
        # batch invariance is promised in float32 (docs/serving.md): 16-bit kernels round by batch shape
        exact = ModelConfig(model_path=str(path), model_name=label, device=ctx.device, dtype="float32")
        with local_api(exact, EngineConfig(max_batch_size=64, kv_cache_memory=kv)) as (_, engines):
            engine = engines[label]

            async def collect(q):
                return "".join([d.text async for d in engine.generate(q)])

            alone = [asyncio.run(collect(q)) for q in reqs]

            async def together():
                return await asyncio.gather(*(collect(q) for q in reqs))

            r.expect(asyncio.run(together()) == alone,
                     f"{label} on {ctx.device}, float32: 8 batched greedy answers = alone")
        model = ModelConfig(model_path=str(path), model_name=label, device=ctx.device)  # --dtype auto, as served
        with local_api(model, EngineConfig(max_batch_size=64, kv_cache_memory=kv)) as (base, engines):
            r.note(f"{label} hf on {ctx.device}: serving in {engines[label].info()['dtype']}")
            conformance(base, label, r, f"{label} hf")
            tokens = 32 if ctx.dry else 128
            for c in levels:
                r.note(f"{label} hf on {ctx.device}: c={c}: {throughput(base, label, c, tokens):.1f} tok/s")


@check("vllm", "vLLM backend through our API: conformance, tok/s vs the HF engine")
def check_vllm(ctx: Context, r: Result) -> None:
    why = "vLLM runs on CUDA only" if ctx.device != "cuda" else missing("vllm")
    if why:
        r.skip(why + " (its wheel is several hundred MB: not among the carried wheels, docs/gpu.md); its option "
               "mapping is tested on CPU in tests/test_serve_vllm.py")
        return
    from vicuna.serve.engine import EngineConfig
    from vicuna.serve.launch import ModelConfig, local_api

    for label, path in ctx.models:
        rates = {}
        for backend in ("vllm", "hf"):
            model = ModelConfig(model_path=str(path), model_name=label, backend=backend)
            with local_api(model, EngineConfig(max_batch_size=64, max_model_len=2048)) as (base, _):
                if backend == "vllm":
                    conformance(base, label, r, f"{label} vllm")
                rates[backend] = throughput(base, label, 16, 128)
        r.note(f"{label}: c=16 vllm {rates['vllm']:.1f} tok/s, hf {rates['hf']:.1f} tok/s "
               f"(x{rates['vllm'] / max(rates['hf'], 1e-9):.2f})")


# ------------------------------------------------------------------------- FSDP2: 2 ranks


def fsdp_two_ranks(ctx: Context, r: Result, backend: str) -> None:
    """2 ranks under torchrun: sharded loading of the base, per-rank checkpoint shards, resume bit-equal (float32).

    ``backend`` nccl runs on the GPUs; gloo hides them (CUDA_VISIBLE_DEVICES="") so the same trainer path runs on
    the CPU, where init_distributed picks gloo.
    """
    env = {"OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if backend == "gloo" else {})
    steps = max(2, ctx.steps // 2)
    common = ("--max-steps", steps, "--save-steps", 1, "--fsdp", "full_shard", "--no-packing", "--precision", "fp32",
              "--per-device-batch-size", 1, *FP32_ATTN)
    ref, out = ctx.work / f"fsdp-{backend}-ref", ctx.work / f"fsdp-{backend}"
    p = torchrun(2, *train_args(ctx, ctx.tiny, ref, *common), env=env)
    if not r.expect(p.returncode == 0 and (ref / "vicuna.json").exists(),
                    f"2 ranks over {backend}: {steps} steps with --fsdp full_shard, model saved" + tail(p)):
        return
    meta = json.loads((ref / "vicuna.json").read_text())
    r.expect(meta.get("train", {}).get("world_size") == 2, f"the run's summary says world size "
             f"{meta.get('train', {}).get('world_size')} (2)")
    r.expect("loading the whole model on every rank" not in p.stderr,
             "sharded loading: each rank read only its shard of the base weights (no whole-model fallback)")
    first = ref / "checkpoint-1"
    shards = sorted(x.name for x in (first / "state").glob("shard-*.safetensors"))
    ranks = {name.split("-")[1] for name in shards}
    r.expect(ranks == {"00001", "00002"}, f"{first.name} holds both ranks' shards ({len(shards)} files from ranks "
             f"{sorted(ranks)})")
    out.mkdir()
    shutil.copytree(first, out / first.name)
    p = torchrun(2, *train_args(ctx, ctx.tiny, out, *common), env=env)
    if r.expect(p.returncode == 0 and "resumed from" in p.stderr, f"2 ranks over {backend}: resumed from "
                f"{first.name}" + tail(p)):
        d = weight_diff(ref, out)
        r.expect(d == 0.0, f"resumed weights bit-equal to the uninterrupted run's (float32; max |diff| {d:.3g})")


@check("fsdp-nccl", "FSDP2, 2 ranks over NCCL: sharded load, per-rank checkpoint, resume bit-equal")
def check_fsdp_nccl(ctx: Context, r: Result) -> None:
    import torch

    gpus = torch.cuda.device_count() if ctx.device == "cuda" else 0
    if gpus < 2:
        r.skip(f"{gpus} GPU(s) visible: 2 NCCL ranks need 2 GPUs (check fsdp-gloo runs the same path over gloo)")
        return
    fsdp_two_ranks(ctx, r, "nccl")


@check("fsdp-gloo", "FSDP2, 2 ranks over gloo on the CPU: sharded load, per-rank checkpoint, resume bit-equal")
def check_fsdp_gloo(ctx: Context, r: Result) -> None:
    fsdp_two_ranks(ctx, r, "gloo")


# ------------------------------------------------------------------------- set-up, report


def prepare(work: Path) -> tuple[Path, Path]:
    """A tiny random LLaMA (byte-level BPE, vicuna_v1.1 template) and a small ShareGPT file."""
    from vicuna.tiny import make_tiny_llama, save_model, train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=512)
    tiny = save_model(make_tiny_llama(tok), tok, work / "tiny-llama")
    recs = [{"id": f"{r}-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for r in range(4) for i, (q, a) in enumerate(QA)]
    data = work / "train.json"
    data.write_text(json.dumps(recs))
    return tiny, data


def environment(device: str) -> list[str]:
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, device {device}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}")
    for name in ("transformers", "peft", "accelerate", "flash_attn", "bitsandbytes", "vllm", "fastapi", "openai",
                 "gguf"):
        try:
            mod = __import__(name)
            version = getattr(mod, "__version__", None) or importlib.metadata.version(name.replace("_", "-"))
            lines.append(f"{name} {version}")
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
            lines.append(f"{name}: not importable ({type(e).__name__})")
    return lines


def report(results: list[tuple[Check, Result]], env: list[str], dry: bool, real: Path | None) -> str:
    head = "# GPU verification pack" + (" (dry mode, CPU)" if dry else "")
    model = f"tiny random LLaMA and {real.name}" if real else "tiny random LLaMA only (no --real-model)"
    out = [head, "", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "", *[f"- {e}" for e in env],
           f"- models: {model}", "", "| check | what | result | seconds |", "|---|---|---|---|"]
    out += [f"| {c.name} | {c.what} | {r.status} | {r.seconds:.0f} |" for c, r in results]
    out += ["", f"{sum(r.seconds for _, r in results):.0f} s in all; "
            + ", ".join(f"{sum(r.status == s for _, r in results)} {s}" for s in (PASS, FAIL, SKIP))]
    for c, r in results:
        out += ["", f"## {c.name}: {r.status}", "", c.what, ""] + [f"- {line}" for line in r.lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-vicuna"]:  # internal: how the checks start `vicuna` (see run_vicuna)
        return run_vicuna(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m vicuna.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU: run the checks that can run there at tiny size, SKIP "
                    "the others (default when no GPU is visible)")
    ap.add_argument("--real-model", type=Path, default=None, metavar="DIR",
                    help="also run the checks on this Hugging Face model folder (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--only", default=None, metavar="NAMES", help="comma-separated check names (see --list); "
                    "default: all")
    ap.add_argument("--list", action="store_true", help="print each check's name and what it verifies, then exit")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 20; dry: 4)")
    ap.add_argument("--report", type=Path, default=Path("gpu-report.md"), help="markdown report to write "
                    "(default: gpu-report.md)")
    args = ap.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:12} {c.what}")
        return 0
    names = [c.name for c in CHECKS]
    only = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        print(f"error: --only: unknown check(s) {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.real_model is not None and not (args.real_model / "config.json").is_file():
        print(f"error: --real-model {args.real_model}: no config.json there; pass a Hugging Face model folder",
              file=sys.stderr)
        return 2
    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("no CUDA GPU visible: running the dry mode (CPU-capable checks at tiny size)", file=sys.stderr)
    device = "cpu" if dry else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    results = []
    try:
        tiny, data = prepare(work)
        ctx = Context(dry=dry, device=device, work=work, tiny=tiny, data=data, real=args.real_model,
                      steps=args.steps or (4 if dry else 20))
        for c in CHECKS:
            if c.name not in only:
                continue
            r, t = Result(), time.perf_counter()
            print(f"({c.name}) {c.what} ...", file=sys.stderr, flush=True)
            try:
                c.run(ctx, r)
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                r.expect(False, f"raised {type(e).__name__}: {e}")
                r.note("```\n" + traceback.format_exc()[-2000:] + "\n```")
            r.finish()
            r.seconds = time.perf_counter() - t
            gc.collect()  # what one check loaded on the GPU is not left to the next
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"({c.name}) {r.status} in {r.seconds:.0f} s", file=sys.stderr, flush=True)
            results.append((c, r))
        text = report(results, environment(device), dry, args.real_model)
        write_text(args.report, text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.status == FAIL for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
