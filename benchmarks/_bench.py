"""What every script in benchmarks/ shares: `--quick`, `--record`, and skipping a peer with its reason.

`--record` keeps what the script prints on stdout (the tables docs/benchmarks.md shows, nothing else)
in ``benchmarks/results/NAME.txt``, so every figure in the docs can be traced to a committed output.
Progress and skip notices go to stderr and are not recorded.  Not a benchmark itself (the leading
underscore keeps it out of the Makefile's list).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="a small run (well under a minute) that only shows the script works end to end; "
                         "its figures mean nothing")
    ap.add_argument("--record", action="store_true",
                    help="also write what is printed on stdout to benchmarks/results/NAME.txt (run it on an idle "
                         "machine; docs/benchmarks.md shows these files). Refused with --quick")


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's flags plus ``--quick`` and ``--record``, parsed."""
    add_flags(ap)
    args = ap.parse_args()
    if args.quick and args.record:
        ap.error("--record keeps figures for the docs: run it without --quick")
    return args


def skip(what: str, reason: str) -> None:
    """A peer or baseline that cannot run here: said on stderr, the run goes on without it."""
    print(f"SKIPPED {what}: {reason}", file=sys.stderr, flush=True)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def recording(name: str, args: argparse.Namespace) -> Iterator[None]:
    """With ``--record``: stdout of the block goes to the terminal and, once the block ends well, to the results file."""
    if not getattr(args, "record", False):
        yield
        return
    if args.quick:
        raise SystemExit("--record keeps figures for the docs: run it without --quick")  # parse_args says so first
    from vicuna.files import write_text

    buf = io.StringIO()
    real = sys.stdout
    sys.stdout = _Tee(real, buf)
    try:
        yield
    finally:
        sys.stdout = real
    RESULTS.mkdir(exist_ok=True)
    out = write_text(RESULTS / f"{name}.txt", buf.getvalue())
    print(f"recorded {out.relative_to(ROOT)}", file=sys.stderr)
