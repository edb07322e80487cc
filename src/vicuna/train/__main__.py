"""`python -m vicuna.train ...` (what torchrun runs): the same flags as `vicuna train`."""

import sys

from ..cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    top = [a for a in args if a == "--debug"]  # a top-level `vicuna` flag
    sys.exit(main([*top, "train", *[a for a in args if a != "--debug"]]))
