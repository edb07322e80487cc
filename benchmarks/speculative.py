"""`--speculative ngram` (prompt-lookup drafting) against plain decoding, one stream at a time.

Speculation pays where the answer copies spans of its input, so the tasks are input-grounded: fix the
spelling of a paragraph, rename a variable in a snippet, summarise a note quoting its key sentence,
reformat notes into a list keeping their wording (texts written for this script). One open-ended
control question shows what speculation costs where little is copied. Issue 25's target: n-gram
speculation >= 1.5x plain tok/s at c=1 on input-grounded tasks, same output.

One model in memory serves two HF engines, plain and `speculative="ngram"`; each task is sent to both
in turn, greedy (temperature 0), one request at a time after a warm-up request on each. Per task:

  tok/s        output tokens / the request's wall time (prefill included, the same in both)
  accepted     accepted draft tokens / draft tokens verified, from the engine's counters for that request
  same output  whether both engines gave the same text: they must in float32 (exit status 1 if not); in
               bfloat16 the wider verify forward may round differently (docs/serving.md)

    .venv/bin/python benchmarks/speculative.py                       # default model, --dtype auto
    .venv/bin/python benchmarks/speculative.py --dtype float32       # where exact equality is promised
    .venv/bin/python benchmarks/speculative.py --quick               # one task, 32 tokens
    .venv/bin/python benchmarks/speculative.py --num-speculative-tokens 8 --prompt-lookup-max 4
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _bench import parse_args, recording  # noqa: E402

SPELLING = """\
The harbour town wakes up slowly in the winter. Before dawn the fishing boats leave the quay one by one,
their lamps swaying above the dark water. By eight o'clock the bakery on the corner has sold most of its
bread, and the ferry to the island is waiting for the first pasengers. The market opens at nine, when the
stall holders have finished unloading their vans and the smell of coffee drifts across the square. Most
visitors arrive in the afternon, walk along the sea wall to the lighthouse, and leave before it gets dark.
In the evening the town is quiet again, and only the wind and the bells of the moored boats can be herd."""

CODE = '''\
def summarize_scores(scores, threshold):
    """Count, total and average of the scores at or above the threshold."""
    x = 0
    total = 0
    for score in scores:
        if score < threshold:
            continue
        x += 1
        total += score
    if x == 0:
        return {"count": 0, "total": 0, "average": None}
    average = total / x
    report = {"count": x, "total": total, "average": average}
    if x > 10:
        report["note"] = "large sample"
    elif x < 3:
        report["note"] = "small sample"
    return report


print(summarize_scores([4, 8, 15, 16, 23, 42], threshold=10))'''

NOTE = """\
The library will change its opening hours from the first of March. On weekdays it will open at nine in
the morning and close at eight in the evening, one hour later than now. On Saturdays it will open at ten
and close at four. The reading room on the second floor will stay closed until the new heating system is
installed, which the council expects to finish by the end of April. Members can still borrow and return
books at the front desk during the works. Key sentence: the reading room stays closed until the new
heating system is installed."""

MEETING = """\
Anna will send the revised budget to the committee by Friday.
The venue for the spring fair is the school hall, booked for the twelfth of May.
Tom is asking three local bakeries whether they can donate cakes.
Volunteers for the ticket desk should write their names on the sheet in the staff room.
The next meeting is on Tuesday at seven in the evening in the library."""

TASKS = {  # name -> the user's message; the answer copies spans of it, so drafts are accepted
    "fix spelling": f"Repeat the following text exactly, fixing the spelling mistakes:\n\n{SPELLING}",
    "rename variable": f"Rewrite this code with the variable `x` renamed to `count`:\n\n```python\n{CODE}\n```",
    "summarise and quote": f"Summarise the following note in two sentences, then quote its key sentence word for "
                        f"word:\n\n{NOTE}",
    "notes to list": f"Turn these meeting notes into a bulleted list, one bullet per line, keeping the wording "
                     f"of each line:\n\n{MEETING}",
}
CONTROL = {"control: open question": "Why do leaves change colour in autumn? Explain it to a child."}


def request(text: str, max_tokens: int):
    """A chat request as an API client would send it: greedy, and repetition_penalty 1 — the model's shipped
    default (SmolLM2: 1.2) would both fight the copying and keep the row from speculating at all."""
    from vicuna.serve.core import GenerateRequest

    return GenerateRequest(messages=[{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens,
                           repetition_penalty=1.0)


async def one_request(engine, text: str, max_tokens: int) -> tuple[str, int, float]:
    """(text, output tokens, wall seconds) of one streamed request."""
    started, answer, tokens = time.perf_counter(), "", 0
    async for delta in engine.generate(request(text, max_tokens)):
        answer, tokens = answer + delta.text, delta.completion_tokens
    return answer, tokens, time.perf_counter() - started


def measure(engine, text: str, max_tokens: int) -> dict:
    """One request alone on ``engine``, with the draft counters it moved (zero on the plain engine)."""
    before = engine.stats()
    text, tokens, seconds = asyncio.run(one_request(engine, text, max_tokens))
    after = engine.stats()
    return {"text": text, "tokens": tokens, "rate": tokens / seconds,
            "drafted": after.spec_draft_tokens - before.spec_draft_tokens,
            "accepted": after.spec_accepted_tokens - before.spec_accepted_tokens,
            "steps": after.decode_steps - before.decode_steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="Hugging Face model folder (default: the default model)")
    ap.add_argument("--dtype", default="auto", help="as `vicuna serve --dtype` (default: auto)")
    ap.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256; --quick 32)")
    from vicuna.serve.engine import EngineConfig  # the serve defaults are the benchmark's

    for flag in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
        default = getattr(EngineConfig, flag)
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=default,
                        help=f"as `vicuna serve` (default {default})")
    ap.add_argument("--show-outputs", action="store_true", help="print both engines' answers on stderr")
    args = parse_args(ap)  # --quick: the first task only, 32-token answers, no control
    with recording("speculative", args):
        return run(args)


def run(args) -> int:
    import torch

    from vicuna.model import load_model, resolve_model_path
    from vicuna.serve.engine import EngineConfig, HFEngine

    model_dir = resolve_model_path(args.model_dir)
    max_tokens = 32 if args.quick else args.max_tokens
    tasks = dict(list(TASKS.items())[:1]) if args.quick else {**TASKS, **CONTROL}
    loaded = load_model(model_dir, device="cpu", dtype=args.dtype)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    spec = dict(speculative="ngram", num_speculative_tokens=args.num_speculative_tokens,
                prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min)
    engines = {"plain": HFEngine(loaded, EngineConfig(kv_cache_memory="256MiB")),
               "ngram": HFEngine(loaded, EngineConfig(kv_cache_memory="256MiB", **spec))}
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {Path(model_dir).name}, dtype {dtype} (--dtype {args.dtype}); "
          f"--speculative ngram --num-speculative-tokens {args.num_speculative_tokens} --prompt-lookup-max "
          f"{args.prompt_lookup_max} --prompt-lookup-min {args.prompt_lookup_min}; greedy, repetition_penalty 1.0 "
          f"(the model's default: {loaded.defaults.repetition_penalty:g}), c=1, max_tokens {max_tokens}")
    rows = {}
    try:
        for engine in engines.values():
            engine.start()
            measure(engine, "Say hello.", 4)  # warm-up: first-call costs out of the figures
        for name, text in tasks.items():
            prompt_tokens = len(engines["plain"].prepare(request(text, max_tokens))[0])
            rows[name] = {"prompt": prompt_tokens,
                          **{mode: measure(engine, text, max_tokens) for mode, engine in engines.items()}}
            r = rows[name]
            print(f"  {name}: plain {r['plain']['rate']:.1f} tok/s, ngram {r['ngram']['rate']:.1f} tok/s, "
                  f"{r['ngram']['tokens']} tokens in {r['ngram']['steps']} steps", file=sys.stderr, flush=True)
            if args.show_outputs:
                for mode in engines:
                    print(f"--- {mode}:\n{r[mode]['text']}", file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            engine.stop()

    print(f"\n## n-gram speculation vs plain decoding at one stream ({dtype})")
    print("| task | prompt tokens | output tokens | plain tok/s | ngram tok/s | speedup | accepted | same output |")
    print("|---|---|---|---|---|---|---|---|")
    grounded, differ = [], []
    for name, r in rows.items():
        plain, ngram = r["plain"], r["ngram"]
        speedup = ngram["rate"] / plain["rate"]
        if name in TASKS:
            grounded.append(speedup)
        same = plain["text"] == ngram["text"]
        if not same:
            differ.append(name)
        rate = f"{ngram['accepted'] / ngram['drafted']:.0%}" if ngram["drafted"] else "-"
        tokens = (f"{plain['tokens']}" if plain["tokens"] == ngram["tokens"]
                  else f"{plain['tokens']} / {ngram['tokens']}")  # plain / ngram where the answers differ
        print(f"| {name} | {r['prompt']} | {tokens} | {plain['rate']:.1f} | {ngram['rate']:.1f} | {speedup:.2f}x | "
              f"{rate} ({ngram['accepted']}/{ngram['drafted']}) | {'yes' if same else 'NO'} |")
    mean = math.exp(sum(map(math.log, grounded)) / len(grounded))
    same_grounded = sum(name not in differ for name in rows if name in TASKS)
    met = mean >= 1.5 and same_grounded == len(grounded)
    print(f"geometric-mean speedup over {len(grounded)} input-grounded task{'s' * (len(grounded) > 1)}: "
          f"{mean:.2f}x, same output in {same_grounded} of {len(grounded)}; target (>= 1.5x, same output): "
          f"{'met' if met else 'not met'}")
    if differ:
        exact = dtype == "float32"
        print(f"outputs differ in {', '.join(differ)}: "
              + ("a bug, float32 greedy speculation must give plain decoding's output" if exact else
                 f"in {dtype} the verify forward may round differently; --dtype float32 checks equality"))
        return 1 if exact else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
