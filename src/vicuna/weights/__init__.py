"""`vicuna weights`: delta weights, LoRA merge, dtype conversion, special-token repair, verification.

Checkpoints are read tensor by tensor (safetensors or old ``.bin`` files) and
written as sharded safetensors into a temporary folder that is renamed onto the
target only when everything succeeded, so a failed run never leaves a partial
model behind.  This module stays import-light (no torch) so ``vicuna --help``
is fast; the work lives in the submodules.
"""

from __future__ import annotations


def add_commands(sub) -> None:
    from .cli import add_commands as _add

    _add(sub)
