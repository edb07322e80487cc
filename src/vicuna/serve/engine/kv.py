"""Paged KV cache: a memory budget split into fixed-size blocks that sequences take as they grow.

Why paged: the first engine preallocated ``max_batch_size`` rows of the full
context (12 GB for a 135M model, ~64 GiB for a 7B one), so memory was decided
by the wrong setting and most of it sat unused. Here the budget
(``--kv-cache-memory``) is split into blocks of ``block_size`` tokens; a
sequence holds a list of blocks (its block table) and takes one more only when
it crosses a block boundary, so memory follows the tokens actually in flight
and the scheduler admits requests by free blocks (vLLM's design).

Physical layout and what it costs. Each layer's keys and values live in one
pool of *slots*, shape ``(num_blocks * block_size, kv_heads, head_dim)``;
token ``i`` of a sequence sits in slot ``table[i // block_size] * block_size +
i % block_size``. A forward writes its new tokens' K/V into their slots (one
``index_copy_`` per layer). A prefill attends to its own fresh K/V, so it reads
nothing back; a decode step gathers each row's slots into a scratch buffer
shared by all layers (one ``index_select`` per layer and per K/V) and runs
SDPA on it. The gather is the price of paging without a paged-attention
kernel for CPUs: measured on this 2-core machine for SmolLM2's 30 layers it
costs about as much again as the attention read itself (at batch 16 and 200
tokens of context, 38 ms of attention became 55 ms), a few percent of a decode
step whose weights dominate, and far cheaper than the per-step ``torch.cat``
of a growing cache (a fifth of the step at batch 16) or the old shifts and row
copies. The gather reads token slots, not whole blocks, so a block's unused
tail is never read and blocks need no zeroing; slot 0 (in block 0, which is
never handed out) is kept finite and is where padding reads from and writes
to. The scratch holds one layer's gathered K/V for the batch, ``batch × longest row``
slots: about the cache in use divided by the layers, more when one long row pads many short
ones. On CUDA at scale use the vLLM backend, whose kernels read blocks in place.

Which blocks a sequence holds, and which are shared through the prefix cache, is decided by
:mod:`vicuna.serve.engine.scheduler` (no torch); this module only sizes and holds the pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import UsageError
from ...sizes import GiB, format_size

CPU_FRACTION, CPU_CAP = 0.25, 4 * GiB  # default on CPU: min(a quarter of available RAM, 4 GiB)
GPU_UTILIZATION = 0.90  # default on CUDA: the cache fills the device up to 90% of its total memory


class KVCacheError(UsageError):
    """A KV cache setting that cannot work; the message says what to change (exit code 2)."""


@dataclass(frozen=True)
class KVShape:
    """What one token costs in the cache: two tensors (K, V) per layer of ``kv_heads × head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, config: Any, dtype: Any) -> "KVShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype.itemsize)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class KVPlan:
    """How a budget is cut: ``num_blocks`` usable blocks of ``block_size`` tokens (block 0 comes on top)."""

    shape: KVShape
    block_size: int
    num_blocks: int

    @classmethod
    def for_budget(cls, shape: KVShape, budget_bytes: int, block_size: int = 16) -> "KVPlan":
        if block_size < 1:
            raise KVCacheError(f"block_size must be >= 1, got {block_size}")
        per_block = shape.bytes_per_token * block_size
        num_blocks = budget_bytes // per_block - 1  # one block is reserved for padding
        if num_blocks < 1:
            raise KVCacheError(
                f"a KV cache of {format_size(budget_bytes)} holds no block of {block_size} tokens "
                f"({format_size(per_block)} each for this model); raise --kv-cache-memory")
        return cls(shape, block_size, num_blocks)

    @property
    def tokens(self) -> int:
        """Tokens the cache holds in all (the longest sequence it can serve alone)."""
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return (self.num_blocks + 1) * self.block_size * self.shape.bytes_per_token

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def sequences(self, tokens_each: int) -> int:
        """How many sequences of ``tokens_each`` tokens fit at once."""
        return self.num_blocks // self.blocks_for(tokens_each)


def gpu_budget(free_bytes: int, total_bytes: int, utilization: float = GPU_UTILIZATION) -> int:
    """vLLM's rule: everything up to ``utilization`` of the device, less what is already used (weights...)."""
    return int(free_bytes - (1 - utilization) * total_bytes)


def cpu_budget(available_bytes: int) -> int:
    return int(min(CPU_FRACTION * available_bytes, CPU_CAP))


def default_budget(device: Any) -> tuple[int, str]:
    """The default ``--kv-cache-memory`` on ``device`` and a sentence saying how it was chosen."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return gpu_budget(free, total), (f"{GPU_UTILIZATION:.0%} of {format_size(total)} on {device} less the "
                                         f"{format_size(total - free)} already in use")
    available = _available_ram()
    return cpu_budget(available), (f"min({CPU_FRACTION:.0%} of {format_size(available)} available RAM, "
                                   f"{format_size(CPU_CAP)})")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # macOS and friends: total RAM


class PagedKVCache:
    """The pools of every layer, and the ``transformers`` cache interface the attention layers call.

    Before each forward the engine says where the new tokens go
    (``write_slots``, one slot per input token) and, for a decode step, which
    slots each row reads (``read_slots``, ``(batch, T)``); the model's attention
    layers then call :meth:`update` once per layer.
    """

    is_compileable = False

    def __init__(self, plan: KVPlan, dtype: Any, device: Any):
        import torch

        s = plan.shape
        slots = (plan.num_blocks + 1) * plan.block_size
        # torch.empty: on CPU no page is touched until a block is written (idle memory stays low)
        self.k = [torch.empty(slots, s.kv_heads, s.head_dim, dtype=dtype, device=device) for _ in range(s.layers)]
        self.v = [torch.empty(slots, s.kv_heads, s.head_dim, dtype=dtype, device=device) for _ in range(s.layers)]
        for pool in (*self.k, *self.v):
            pool[0].zero_()  # the padding slot: read under a mask, so it must be finite
        self.plan = plan
        self._write = None
        self._read = None
        self._scratch: list = []

    def plan_forward(self, write_slots, read_slots=None) -> None:
        """``write_slots``: 1-D, a slot per input token (row-major); ``read_slots``: ``(B, T)`` or None."""
        import torch

        self._write = write_slots
        self._read = read_slots
        if read_slots is not None:
            n, pool = read_slots.numel(), self.k[0]
            if not self._scratch or self._scratch[0].shape[0] < n:
                self._scratch = [torch.empty(n, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
                                 for _ in range(2)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        import torch

        b, h, n, d = key_states.shape
        out = []
        for pool, new, scratch in zip((self.k[layer_idx], self.v[layer_idx]), (key_states, value_states),
                                      self._scratch or (None, None)):
            pool.index_copy_(0, self._write, new.transpose(1, 2).reshape(b * n, h, d))
            if self._read is None:  # a prefill attends to its own new keys
                out.append(new)
                continue
            rows, t = self._read.shape
            buf = scratch[:rows * t]
            torch.index_select(pool, 0, self._read.view(-1), out=buf)
            out.append(buf.view(rows, t, h, d).transpose(1, 2))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the engine always passes position_ids
        return 0
