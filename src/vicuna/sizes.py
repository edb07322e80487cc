"""Byte sizes written by people (``--kv-cache-memory 4GiB``, ``--max-shard-size 5GB``), read one way everywhere.

The rule is Hugging Face's and accelerate's (``max_shard_size``, ``max_memory``): K/M/G/T
(with or without a trailing B) are powers of 1000, KiB/MiB/GiB/TiB powers of 1024. So
``5GB`` is 5·10⁹ bytes and ``4GiB`` is 4·2³⁰, and a size copied from a transformers or
accelerate command line means the same bytes here.
"""

from __future__ import annotations

import re

from .errors import UsageError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": KiB, "MI": MiB, "GI": GiB, "TI": TiB}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?(b)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"4GiB"`` -> 4·2³⁰, ``"5GB"``/``"5G"`` -> 5·10⁹, ``"512MiB"``, ``"1.5k"``, ``"1000"``.

    Raises :class:`~vicuna.errors.UsageError` (exit code 2) for anything else, zero and negatives included.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        value = int(float(m.group(1)) * _SCALE[(m.group(2) or "").upper()]) if m else 0
    if value <= 0:
        raise UsageError(f"cannot read {text!r} as a memory size: write a positive number with an optional unit, e.g. "
                         "4GiB or 512MiB (powers of 1024), 5GB or 500M (powers of 1000), or a byte count")
    return value


def format_size(n: float) -> str:
    """``n`` bytes in binary units, as the engines log their memory (``8.5 GiB``)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
