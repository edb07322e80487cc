"""The GPU verification pack: every CUDA path of the project, exercised in one run.

    python -m vicuna.gpucheck                 # on a GPU machine: all checks, report gpu-report.md
    python -m vicuna.gpucheck --dry           # on a CPU: the same code paths at tiny size, CUDA parts skipped

Checks (issue 17): (a) packed vs unpacked loss, flash-attention-2 varlen vs SDPA, tokens/s and
MFU; (b) bf16 full fine-tuning, SIGKILL mid-run, resume to the same weights; (c) QLoRA steps,
8- and 4-bit loading answering a greedy prompt; (d) the HF engine on CUDA: batched greedy =
alone, throughput at c=1/16/64; (e) the vLLM backend through our API: conformance and
throughput vs the HF engine; (f) FSDP2 at world size 1 (NCCL on CUDA, gloo in dry mode):
save and resume.

Each check runs the project's real entry points (`vicuna train` in a subprocess, the engine,
`launch.local_api` and the official openai client) on a tiny random LLaMA, and on the real
model when ``--real-model DIR`` is given. It writes a markdown report and exits 1 if any
check failed; a check whose prerequisites are missing (no GPU in dry mode, no vLLM wheel)
is SKIP with the reason, never PASS.
"""

from __future__ import annotations

import argparse
import asyncio
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


@dataclass
class Result:
    status: str = PASS
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        self.lines.append(text)

    def expect(self, ok: bool, text: str) -> None:
        """Record a verdict; one false one fails the check."""
        self.lines.append(("ok: " if ok else "FAILED: ") + text)
        if not ok:
            self.status = FAIL

    def skip(self, why: str) -> "Result":
        self.lines.append("skipped: " + why)
        if self.status == PASS and not any(line.startswith(("ok:", "FAILED:")) for line in self.lines[:-1]):
            self.status = SKIP
        return self


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


def vicuna(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `python -m vicuna ARGS` (the user's entry point) and return its result."""
    return subprocess.run([sys.executable, "-m", "vicuna", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=kw.pop("timeout", 900), **kw)


def train_args(ctx: Context, model: Path, out: Path, *extra) -> list:
    return ["train", "--model-path", model, "--data-path", ctx.data, "--output-dir", out, "--max-length", 128,
            "--per-device-batch-size", 2, "--learning-rate", "3e-3", "--seed", 7, "--save-total-limit", 5, *extra]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def same_weights(a: Path, b: Path, atol: float = 1e-6) -> bool:
    wa, wb = weights(a), weights(b)
    return bool(wa) and wa.keys() == wb.keys() and all((wa[k].float() - wb[k].float()).abs().max() <= atol for k in wa)


# ------------------------------------------------------------------------- (a) packing


def check_packing(ctx: Context, r: Result) -> None:
    import torch

    from vicuna.model import load_model
    from vicuna.train.dataset import IGNORE_INDEX, collate, tokenize_dataset

    impls = ["sdpa"]
    if ctx.device == "cuda":
        try:
            import flash_attn  # noqa: F401

            impls.append("flash_attention_2")
        except ImportError:
            r.expect(False, "flash-attn is not importable on this GPU machine (carry its wheel in .whl/)")
    else:
        r.note("flash_attention_2: needs CUDA and flash-attn (dry mode: SDPA only)")
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    for label, path in ctx.models:
        lm = load_model(path, device=ctx.device)
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
        samples = tokenize_dataset(convs, lm.tokenizer, lm.template, 128)
        pad = lm.tokenizer.pad_token_id or 0
        losses = {}
        for impl in impls:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).to(ctx.device)
            for packed in (True, False):
                rows = [list(range(len(samples)))] if packed else [[i] for i in range(len(samples))]
                batch = collate(samples, rows, pad, packed=packed)
                inputs = {k: batch[k].to(ctx.device) for k in ("input_ids", "position_ids", "attention_mask")
                          if k in batch}
                with torch.no_grad():
                    logits = model(**inputs).logits.float()
                tgt = batch["targets"].to(ctx.device)
                losses[impl, packed] = float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")) / int(
                    (tgt != IGNORE_INDEX).sum())
        ref = losses["sdpa", False]
        for (impl, packed), loss in losses.items():
            if (impl, packed) == ("sdpa", False):
                continue
            r.expect(abs(loss - ref) <= 1e-3 * max(1.0, abs(ref)),
                     f"{label}: {impl} {'packed' if packed else 'unpacked'} loss {loss:.5f} vs SDPA unpacked "
                     f"{ref:.5f}")
    # throughput and MFU from a short real training run (the trainer logs both)
    out = ctx.work / "packing-run"
    p = vicuna(*train_args(ctx, ctx.tiny, out, "--max-steps", ctx.steps, "--save-steps", 0, "--packing"))
    r.expect(p.returncode == 0, f"vicuna train --packing ran {ctx.steps} steps" + ("" if p.returncode == 0 else
                                                                                   f": {p.stderr[-500:]}"))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()] if p.returncode == 0 else []
    if rows:
        last = rows[-1]
        r.note(f"tiny, packed, last step: {last.get('tokens_per_s', '?')} tokens/s, MFU {last.get('mfu', '?')}")


# ------------------------------------------------------------------------- (b) resume


def _popen(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vicuna", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_resume(ctx: Context, r: Result) -> None:
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    steps = max(2, ctx.steps)
    every = max(1, steps // 4)
    mid_step = every * max(1, steps // every // 2)  # a checkpoint before the last step: the kill lands mid-run
    common = ("--max-steps", steps, "--save-steps", every, "--precision", precision, "--no-packing")
    for label, path in ctx.models:
        ref, out = ctx.work / f"resume-ref-{label}", ctx.work / f"resume-{label}"
        p = vicuna(*train_args(ctx, path, ref, *common))
        r.expect(p.returncode == 0, f"{label}: {precision} full fine-tuning, {steps} steps uninterrupted"
                 + ("" if p.returncode == 0 else f": {p.stderr[-500:]}"))
        proc = _popen(train_args(ctx, path, out, *common, "--throttle", 0.5))
        mid = out / f"checkpoint-{mid_step}"
        reached = _wait_for(mid / "manifest.json", proc)  # written last: the checkpoint is complete
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r.expect(reached, f"{label}: SIGKILLed after {mid.name} was saved")
        p = vicuna(*train_args(ctx, path, out, *common))
        r.expect(p.returncode == 0 and "resumed from" in p.stderr, f"{label}: rerun resumed from a checkpoint")
        r.expect(p.returncode == 0 and same_weights(ref, out, 1e-2 if precision == "bf16" else 1e-5),
                 f"{label}: resumed weights equal the uninterrupted run's")


# ------------------------------------------------------------------------- (c) QLoRA, 8/4-bit


def check_quantized(ctx: Context, r: Result) -> None:
    out = ctx.work / "lora"
    qlora = ctx.device == "cuda"
    p = vicuna(*train_args(ctx, ctx.tiny, out, "--max-steps", ctx.steps, "--save-steps", 0,
                           "--qlora" if qlora else "--lora", "--lora-r", 4))
    what = "QLoRA (4-bit base)" if qlora else "LoRA (dry mode: QLoRA's 4-bit base needs CUDA)"
    r.expect(p.returncode == 0 and (out / "adapter_model.safetensors").exists(),
             f"{what}: {ctx.steps} steps, adapter saved" + ("" if p.returncode == 0 else f": {p.stderr[-500:]}"))
    if ctx.device != "cuda":
        r.skip("8-bit and 4-bit loading need CUDA and bitsandbytes")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    for label, path in ctx.models:
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        answers = {}
        for bits, q in (("16", None), ("8", BitsAndBytesConfig(load_in_8bit=True)),
                        ("4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))):
            kw = {"quantization_config": q, "device_map": "cuda"} if q else {"dtype": torch.bfloat16}
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            model = model if q else model.to("cuda")
            gen = model.generate(**{k: v.to("cuda") for k, v in ids.items()}, max_new_tokens=16, do_sample=False)
            answers[bits] = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            del model
            torch.cuda.empty_cache()
        for bits in ("8", "4"):
            sensible = bool(answers[bits].strip()) and (label == "tiny" or "Paris" in answers[bits])
            r.expect(sensible, f"{label}: {bits}-bit greedy answer {answers[bits]!r} (bf16: {answers['16']!r})")


# ------------------------------------------------------------------------- (d, e) engines


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


def check_hf_engine(ctx: Context, r: Result) -> None:
    from vicuna.serve.core import GenerateRequest
    from vicuna.serve.engine import EngineConfig
    from vicuna.serve.launch import ModelConfig, local_api

    levels = (1, 16, 64) if not ctx.dry else (1, 4)
    reqs = [GenerateRequest(messages=[{"role": "user", "content": f"Tell me {i} things " * (i % 4 + 1)}],
                            temperature=0, max_tokens=16) for i in range(8)]
    for label, path in ctx.models:
        # batch invariance is promised in float32 (docs/serving.md): 16-bit kernels round by batch shape
        exact = ModelConfig(model_path=str(path), model_name=label, device=ctx.device, dtype="float32")
        with local_api(exact, EngineConfig(max_batch_size=64)) as (_, engines):
            engine = engines[label]

            async def collect(q):
                return "".join([d.text async for d in engine.generate(q)])

            alone = [asyncio.run(collect(q)) for q in reqs]

            async def together():
                return await asyncio.gather(*(collect(q) for q in reqs))

            r.expect(asyncio.run(together()) == alone,
                     f"{label} on {ctx.device}, float32: 8 batched greedy answers = alone")
        model = ModelConfig(model_path=str(path), model_name=label, device=ctx.device)  # --dtype auto, as served
        with local_api(model, EngineConfig(max_batch_size=64)) as (base, engines):
            r.note(f"{label} hf on {ctx.device}: serving in {engines[label].info()['dtype']}")
            conformance(base, label, r, f"{label} hf")
            tokens = 32 if ctx.dry else 128
            for c in levels:
                r.note(f"{label} hf on {ctx.device}: c={c}: {throughput(base, label, c, tokens):.1f} tok/s")


def check_vllm(ctx: Context, r: Result) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        r.skip("vllm is not importable here (CUDA only; its wheel is larger than what the device tool carries — "
               "see docs/gpu.md); its option mapping is tested on CPU in tests/test_serve_vllm.py")
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


# ------------------------------------------------------------------------- (f) FSDP2


def check_fsdp(ctx: Context, r: Result) -> None:
    backend = "NCCL" if ctx.device == "cuda" else "gloo (dry mode)"
    out, ref = ctx.work / "fsdp", ctx.work / "fsdp-ref"
    steps = max(2, ctx.steps // 2)
    common = ("--max-steps", steps, "--save-steps", 1, "--fsdp", "full_shard", "--no-packing")

    def torchrun(dst: Path, *extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               "-m", "vicuna", *map(str, train_args(ctx, ctx.tiny, dst, *common, *extra))],
                              capture_output=True, text=True, timeout=900)

    p = torchrun(ref)
    r.expect(p.returncode == 0 and (ref / "vicuna.json").exists(), f"FSDP2 over {backend}, world size 1: "
             f"{steps} steps, saved" + ("" if p.returncode == 0 else f": {p.stderr[-800:]}"))
    if p.returncode != 0:
        return
    out.mkdir()
    first = ref / "checkpoint-1"
    shutil.copytree(first, out / first.name)
    p = torchrun(out)
    r.expect(p.returncode == 0 and "resumed from" in p.stderr, f"FSDP2: resumed from {first.name}")
    r.expect(p.returncode == 0 and same_weights(ref, out, 1e-5 if ctx.device != "cuda" else 1e-2),
             "FSDP2: resumed weights equal the uninterrupted run's")


CHECKS: list[tuple[str, str, Callable[[Context, Result], None]]] = [
    ("a", "packing: packed vs unpacked loss, flash-attention-2 vs SDPA, tokens/s, MFU", check_packing),
    ("b", "full fine-tuning (bf16 on GPU): SIGKILL mid-run, resume to equal weights", check_resume),
    ("c", "QLoRA steps; 8- and 4-bit loading answer a greedy prompt", check_quantized),
    ("d", "HF engine: batched greedy = alone, API conformance, throughput", check_hf_engine),
    ("e", "vLLM backend through our API: conformance, throughput vs HF", check_vllm),
    ("f", "FSDP2 at world size 1: save and resume", check_fsdp),
]


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
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    for name in ("transformers", "peft", "flash_attn", "bitsandbytes", "vllm", "xllamacpp"):
        try:
            mod = __import__(name)
            lines.append(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
            lines.append(f"{name}: not importable ({type(e).__name__})")
    return lines


def report(results: list[tuple[str, str, Result]], env: list[str], dry: bool) -> str:
    head = "# GPU verification pack" + (" (dry mode, CPU)" if dry else "")
    out = [head, "", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "", *[f"- {e}" for e in env], "",
           "| check | what | result | seconds |", "|---|---|---|---|"]
    out += [f"| {key} | {what} | {r.status} | {r.seconds:.0f} |" for key, what, r in results]
    for key, what, r in results:
        out += ["", f"## ({key}) {what}: {r.status}", ""] + [f"- {line}" for line in r.lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vicuna.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU: run the CPU-capable parts at tiny size, skip CUDA parts "
                    "(default when no GPU is visible)")
    ap.add_argument("--real-model", type=Path, default=None, metavar="DIR",
                    help="also run the checks on this Hugging Face model folder (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--only", default="abcdef", metavar="KEYS", help="run only these checks, e.g. ade")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 20; dry: 4)")
    ap.add_argument("--report", type=Path, default=Path("gpu-report.md"), help="markdown report to write")
    args = ap.parse_args(argv)
    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("no CUDA GPU visible: running the dry mode (CPU-capable parts at tiny size)", file=sys.stderr)
    device = "cpu" if dry else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    results = []
    try:
        tiny, data = prepare(work)
        ctx = Context(dry=dry, device=device, work=work, tiny=tiny, data=data, real=args.real_model,
                      steps=args.steps or (4 if dry else 20))
        for key, what, check in CHECKS:
            if key not in args.only:
                continue
            r, t = Result(), time.perf_counter()
            print(f"({key}) {what} ...", file=sys.stderr, flush=True)
            try:
                check(ctx, r)
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                r.expect(False, f"raised {type(e).__name__}: {e}")
                r.note("```\n" + traceback.format_exc()[-2000:] + "\n```")
            r.seconds = time.perf_counter() - t
            print(f"({key}) {r.status} in {r.seconds:.0f} s", file=sys.stderr, flush=True)
            results.append((key, what, r))
        text = report(results, environment(device), dry)
        write_text(args.report, text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.status == FAIL for _, _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
