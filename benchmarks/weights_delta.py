"""apply-delta side by side: the load-two-models way vs ours (plain and --low-mem).

Baseline = what the reference tool does: load base and delta with
``AutoModelForCausalLM.from_pretrained``, add the delta's parameters into the
base in place, ``save_pretrained``.  Each way runs in a fresh process; peak
RSS is ``getrusage(RUSAGE_CHILDREN)`` of a wrapper process, and "above idle" subtracts
the same tool run on a tiny checkpoint (interpreter + imports).

    .venv/bin/python benchmarks/weights_delta.py            # ~220 MB float32 model, 4 shards
    .venv/bin/python benchmarks/weights_delta.py --layers 31  # ~420 MB
    .venv/bin/python benchmarks/weights_delta.py --record     # keep the table in benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import ROOT, parse_args, recording  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

from test_weights_memory import write_checkpoint  # noqa: E402  (the test's checkpoint builder)

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
base_path, delta_path, target = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
delta = AutoModelForCausalLM.from_pretrained(delta_path, dtype=torch.float32)
dsd = delta.state_dict()
with torch.no_grad():
    for name, p in base.state_dict().items():
        p += dsd[name]
base.save_pretrained(target)
"""

MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
    "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, check=True)
    rc, secs, mib = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return float(secs), float(mib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2, help="best of N")
    args = parse_args(ap)
    big = dict(hidden=512, layers=args.layers, vocab=8000, inter=1376, shards=4)
    if args.quick:
        big, args.repeats = dict(hidden=64, layers=1, vocab=512, inter=128, shards=4), 1
    tiny = dict(hidden=16, layers=1, vocab=64, inter=32, shards=4)
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as d:
        d = Path(d)
        files = write_checkpoint(d / "base", seed=0, **big)
        files += write_checkpoint(d / "delta", seed=1, **big)
        write_checkpoint(d / "tb", seed=0, **tiny)
        write_checkpoint(d / "td", seed=1, **tiny)
        model_mb = sum(f.stat().st_size for f in files) / 2 / 2**20
        shard_mb = max(f.stat().st_size for f in files) / 2**20
        py = [sys.executable]
        ways = {
            "from_pretrained x2 + save_pretrained (baseline)": lambda b, dl, t: py + ["-c", BASELINE, b, dl, t],
            "`vicuna weights apply-delta`": lambda b, dl, t: py + ["-m", "vicuna", "weights", "apply-delta", "--base", b,
                                                                "--delta", dl, "--target", t, "--force"],
            "`vicuna weights apply-delta --low-mem`": lambda b, dl, t: py + [
                "-m", "vicuna", "weights", "apply-delta", "--base", b, "--delta", dl, "--target", t, "--force",
                "--low-mem"],
        }
        rows = []
        for label, make in ways.items():
            # --quick: the model is as small as the idle one, so "above idle" is not measured (0)
            _, idle = (0, 0) if args.quick else measure(make(str(d / "tb"), str(d / "td"), str(d / "tout")))
            best = min((measure(make(str(d / "base"), str(d / "delta"), str(d / "out"))) for _ in range(args.repeats)),
                       key=lambda r: r[0])
            rows.append((label, best[0], best[1], best[1] - idle))
    base_t, _, base_m = rows[0][1], rows[0][2], rows[0][3]
    with recording("weights_delta", args):
        table(rows, model_mb, shard_mb, args, base_t, base_m)


def table(rows, model_mb, shard_mb, args, base_t, base_m) -> None:
    print(f"\napply-delta, float32 LLaMA-like model of {model_mb:.0f} MiB in 4 shards (largest {shard_mb:.0f} MiB)")
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{__import__('torch').__version__}, best of {args.repeats}\n")
    print("| way | time s | × baseline | peak RSS MiB | above idle MiB | × baseline |")
    print("|---|---|---|---|---|---|")
    for label, t, m, above in rows:
        print(f"| {label} | {t:.2f} | {t / base_t:.2f} | {m:.0f} | {above:.0f} | {above / base_m if base_m > 0 else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
