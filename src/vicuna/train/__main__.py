"""`python -m vicuna.train ...` (what torchrun runs): the same flags as `vicuna train`."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
