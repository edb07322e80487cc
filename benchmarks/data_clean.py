"""Benchmark `vicuna data clean` on a synthetic ShareGPT-HTML corpus.

Compares, in one run:

* baseline: the FastChat approach (regex-delete <div>/<span>, ``markdownify`` on
  BeautifulSoup, regex repair of the code header), per conversation, one core;
* ours, in-process: :class:`vicuna.data.clean.Cleaner` per conversation, one core;
* ours, end to end: ``clean_file`` (stream the JSON file, clean, de-duplicate,
  write atomically) with 1 and 2 worker processes.

    .venv/bin/python benchmarks/data_clean.py            # 20,000 conversations
    .venv/bin/python benchmarks/data_clean.py -n 5000 --baseline-n 1000

The baseline needs ``markdownify`` (the ``bench`` extra: ``pip install -e '.[bench]'``, which
``make benchmarks`` installs); without it that row is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from _bench import parse_args, recording, skip  # noqa: E402

from vicuna.data.clean import Cleaner, clean_file  # noqa: E402
from vicuna.data.synthetic import corpus  # noqa: E402


def fastchat_style_baseline():
    """A re-creation of FastChat's clean_sharegpt.html_to_markdown (markdownify-based), for timing."""
    try:
        import markdownify
    except ImportError:
        return None
    div, span = re.compile("<div.*?>"), re.compile("<span.*?>")
    code_lang = re.compile(r"```\s*(.*?)(?:Copy code)+(.+?)\s*?```", re.DOTALL)
    regen = re.compile(r"\d+ / \d+")
    copy_chars = re.compile(r"Copy\d+ chars / \d+ words")
    copy_code = re.compile(r"```(.*?)Copy code\s*```")

    def html_to_markdown(val: str) -> str:
        val = div.sub("", val)
        val = span.sub("", val)
        val = markdownify.markdownify(val).strip()
        val = code_lang.sub(r"```\g<1>\n\g<2>\n```", val)
        m = regen.search(val)
        if m and m.start() == 0:
            val = val[m.end():]
        val = copy_chars.sub("", val)
        val = copy_code.sub("", val)
        return val.replace("\n\n\n", "\n").strip()

    def clean(sample):
        for t in sample["conversations"]:
            html_to_markdown(t["value"])

    return clean


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""
    t, c = time.perf_counter(), os.times()
    fn()
    c2 = os.times()
    cpu = (c2.user - c.user) + (c2.system - c.system) + (c2.children_user - c.children_user) + \
        (c2.children_system - c.children_system)
    return time.perf_counter() - t, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="conversations in the corpus")
    ap.add_argument("--baseline-n", type=int, default=2000, help="conversations for the (slow) baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap)
    if args.quick:
        args.n, args.baseline_n = 300, 50

    data = corpus(args.n, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_clean_"))
    src = tmp / "raw.json"
    src.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    mb = src.stat().st_size / 1e6
    print(f"corpus: {args.n} conversations, {mb:.1f} MB JSON, "
          f"{sum(len(s['conversations']) for s in data) / args.n:.1f} turns/conversation", file=sys.stderr)

    rows = []
    baseline = fastchat_style_baseline()
    base_rate = None
    if baseline is None:
        skip("the FastChat-style baseline", "markdownify is not installed (pip install -e '.[bench]')")
    else:
        sub = data[: args.baseline_n]
        dt, cpu = timed(lambda: [baseline(s) for s in sub])
        base_rate = len(sub) / dt
        rows.append(("FastChat-style markdownify, values only (baseline)", len(sub), dt, cpu))
    cleaner = Cleaner()
    dt, cpu = timed(lambda: [cleaner.clean(s, i) for i, s in enumerate(data)])
    rows.append(("ours: `Cleaner.clean` in-process, all checks", len(data), dt, cpu))
    for workers in (1, 2):
        out = tmp / f"clean_{workers}.json"
        dt, cpu = timed(lambda: clean_file(str(src), str(out), workers=workers, force=True))
        what = " (read + clean + dedup + write)" if workers == 1 else ""
        rows.append((f"ours: `vicuna data clean --workers {workers}`{what}", len(data), dt, cpu))
    same = (tmp / "clean_1.json").read_bytes() == (tmp / "clean_2.json").read_bytes()

    with recording("data_clean", args):
        print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {platform.python_implementation()} "
              f"{platform.python_version()}, corpus of {args.n:,} conversations ({mb:.0f} MB JSON), "
              f"load average {os.getloadavg()[0]:.1f}")
        print("| path | conversations | wall s | conv/s (wall) | CPU s | conv per CPU-second | × baseline (wall) |")
        print("|---|---|---|---|---|---|---|")
        for name, n, dt, cpu in rows:
            rate = n / dt
            ratio = f"{rate / base_rate:.1f}" if base_rate else "-"
            print(f"| {name} | {n:,} | {dt:.2f} | {rate:,.0f} | {cpu:.2f} | {n / cpu:,.0f} | {ratio} |")
        print(f"\nOutputs of 1 and 2 workers byte-identical: {same}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
