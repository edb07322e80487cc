"""Memory per rank: estimated before anything is rented (``vicuna train --dry-run``), measured during a run.

The estimate is arithmetic on the model's shape (built on the meta device: no weights are read) and the run's
settings. Its terms, per rank, for AdamW with fp32 master weights:

- parameters 4 B, gradients 4 B, optimizer 8 B (two moments) per trainable parameter; divided by the world size
  under FSDP. Frozen (LoRA base) parameters cost only their 4 B.
- FSDP working set: what FSDP holds unsharded — the root unit's parameters (final norm, and tied embeddings,
  which both ends of the model use) for the whole step, their gradient and its fp32 reduce-scatter copy at the end
  of backward; and for the largest other unit (a decoder layer, or untied embeddings) two gathered copies (the
  running and the prefetched one), one gradient and its copy.
- activations: what autograd saves for backward, per token and decoder layer, counted op by op for a LLaMA block
  and checked against ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_train_scale.py)::

      2 RMSNorms        2 x (4h [fp32 input] + 2 x b h [normalised, output])
      attention         b (2 a + 2 a_kv) d       q, k, v as SDPA sees them and its output
      SwiGLU MLP        4 b f                     gate, SiLU(gate), up, their product

  with b the compute dtype's bytes; when SDPA gets a mask (packing, padding) it repeats the KV heads and keeps
  the mask (row length x b per token); flash-attention does neither. The loss adds ~12 B x vocab per token (fp32 log-softmax, its gradient, the logits' gradient). With
  gradient checkpointing only each layer's input (b h per token) is kept, plus one layer recomputed in backward.
- peak = parameters + optimizer + working set + activations + gradients when gradients of earlier micro-batches
  are alive during the next one's forward (gradient accumulation); without accumulation the gradients grow as
  backward frees the activations, so the step peaks at the larger of the two (plus the output layer's gradient,
  which backward makes first).

Not counted: the CUDA context and allocator slack (~1-3 GB on a GPU), communication buffers, and on CPU the
interpreter and libraries (the measured figure subtracts them: RSS growth from just before the model is built).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


# ----------------------------------------------------------------------------- measuring


def limit_heap_fragmentation() -> None:
    """On CPU, give every allocation above 64 KiB its own mapping (glibc's ``M_MMAP_THRESHOLD``).

    glibc raises that threshold (up to 32 MiB) each time the process frees a large block; from then on layer-sized
    tensors come from the heap, which fragments and never shrinks. A 2-rank FSDP run of SmolLM2 held 2.7 GB per
    rank that way instead of 1.6 GB. A fixed threshold keeps RSS near what is allocated, for some more page faults.
    Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or the C library is not glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory of this process from :meth:`start` on: CUDA allocator peak on a GPU, else RSS growth.

    On CPU the kernel's high-water mark (``VmHWM``) is reset at the start (``/proc/self/clear_refs``), so what the
    process did before (imports, reading data) does not count, and the interpreter's own RSS is subtracted.
    """

    def __init__(self, device):
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.base = 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = (_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int | None:
        """Bytes above the start, or None where it cannot be measured (no /proc)."""
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(hwm * 1024 - self.base, 0)


# ----------------------------------------------------------------------------- estimating


@dataclass
class MemoryPlan:
    """Bytes per rank."""

    world: int
    sharded: bool
    parameters: int
    trainable: int
    params: float
    grads: float
    optimizer: float
    fsdp_working: float
    activations: float
    activations_checkpointed: float
    gradient_checkpointing: bool
    tokens: int
    accumulation: int = 1
    first_grads: float = 0.0  # the output layer's gradient, made at the start of backward (not sharded)
    offload: bool = False  # FSDP CPU offload: parameters, gradients and optimizer in host RAM

    @property
    def host(self) -> float:
        """Bytes per rank in host RAM with CPU offload (parameters, gradients, optimizer)."""
        return self.params + self.grads + self.optimizer if self.offload else 0.0

    @property
    def active_activations(self) -> float:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations

    @property
    def total(self) -> float:
        act = self.active_activations
        if self.offload:
            return self.fsdp_working + act
        moving = self.grads + act if self.accumulation > 1 else max(self.grads, act + self.first_grads)
        return self.params + self.optimizer + self.fsdp_working + moving

    def to_dict(self) -> dict:
        return {"world_size": self.world, "sharded": self.sharded, "parameters": self.parameters,
                "trainable": self.trainable, "params_gb": self.params / GB, "grads_gb": self.grads / GB,
                "optimizer_gb": self.optimizer / GB, "fsdp_working_gb": self.fsdp_working / GB,
                "activations_gb": self.activations / GB,
                "activations_checkpointed_gb": self.activations_checkpointed / GB,
                "gradient_checkpointing": self.gradient_checkpointing,
                "gradient_accumulation_steps": self.accumulation, "offload": self.offload,
                "host_gb": self.host / GB, "total_gb": self.total / GB}

    def table(self) -> str:
        this = "  <- this run"
        gc = self.gradient_checkpointing
        where = "  (host RAM)" if self.offload else ""
        rows = [("parameters (fp32 master)", self.params, where), ("gradients", self.grads, where),
                ("optimizer (AdamW moments)", self.optimizer, where)]
        if self.sharded:
            rows.append(("FSDP unsharded working set", self.fsdp_working, ""))
        rows += [("activations, no checkpointing", self.activations, "" if gc else this),
                 ("activations, gradient checkpointing", self.activations_checkpointed, this if gc else ""),
                 ("peak per rank (estimate)", self.total, "  (GPU; host RAM above)" if self.offload else "")]
        width = max(len(r[0]) for r in rows) + 2
        return "\n".join(f"{name:<{width}}{value / GB:9.2f} GB{note}" for name, value, note in rows)


def layer_shape(config) -> dict:
    """The sizes that set a LLaMA-style decoder's activation memory."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {"h": h, "f": config.intermediate_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size}


def layer_activation_bytes(shape: dict, *, compute_bytes: int, masked: bool, row_tokens: int) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring for the terms)."""
    h, f, d, b = shape["h"], shape["f"], shape["head_dim"], compute_bytes
    a, kv = shape["heads"], shape["heads"] if masked else shape["kv_heads"]
    mask = b * row_tokens if masked else 0  # SDPA keeps its (row x row) mask, per layer
    return 2 * (4 * h + 2 * b * h) + b * (2 * a + 2 * kv) * d + 4 * b * f + mask


def activation_bytes(shape: dict, tokens: int, *, compute_bytes: int, masked: bool, row_tokens: int,
                     checkpointed: bool) -> float:
    """Bytes autograd keeps for backward, at the loss (the step's high point), for ``tokens`` tokens per rank."""
    h, b = shape["h"], compute_bytes
    per_layer = layer_activation_bytes(shape, compute_bytes=b, masked=masked, row_tokens=row_tokens)
    head = 12 * shape["vocab"] + (2 if b == 2 else 0) * shape["vocab"] + 2 * (4 * h + 2 * b * h)
    kept = shape["layers"] * (b * h if checkpointed else per_layer) + (per_layer if checkpointed else 0)
    return tokens * (kept + head)


def estimate(model, config, *, world: int, units: list, rows: int, row_tokens: int, compute_bytes: int,
             masked: bool, gradient_checkpointing: bool, accumulation: int = 1, frozen_bytes: float = 4,
             offload: bool = False) -> MemoryPlan:
    """Per-rank memory of one training step of ``model`` (real or on the meta device).

    ``units``: the modules FSDP shards on their own (empty: no FSDP); everything else is the root unit.
    ``rows`` x ``row_tokens``: a micro-batch. ``masked``: attention gets a mask (SDPA with packing or padding),
    so SDPA repeats the KV heads and keeps the mask; flash-attention takes the packed rows without one.
    ``frozen_bytes``: bytes per frozen parameter (4 for a LoRA base in fp32, ~0.56 for QLoRA's NF4 with its scales).
    """
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    sharded = bool(units) and world > 1
    div = world if sharded else 1
    b = compute_bytes
    working = 0.0
    if sharded:
        in_units = {id(p) for m in units for p in m.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_units)
        largest = max(sum(p.numel() for p in m.parameters()) for m in units)
        # gathered for the whole step: the root's parameters; at the end of backward its gradient (compute dtype)
        # and that gradient's fp32 reduce-scatter copy. Per unit: two gathered (running, prefetched), one gradient.
        working = root * (2 * b + 4) + largest * (3 * b + 4)
    out = model.get_output_embeddings()
    first = 4 * out.weight.numel() if not sharded and out is not None and out.weight.requires_grad else 0
    shape = layer_shape(config)
    tokens = rows * row_tokens
    kw = {"compute_bytes": compute_bytes, "masked": masked, "row_tokens": row_tokens}
    return MemoryPlan(
        world=world, sharded=sharded, parameters=total, trainable=trainable,
        params=(frozen_bytes * (total - trainable) + 4 * trainable) / div,
        grads=4 * trainable / div, optimizer=8 * trainable / div, fsdp_working=working,
        activations=activation_bytes(shape, tokens, checkpointed=False, **kw),
        activations_checkpointed=activation_bytes(shape, tokens, checkpointed=True, **kw),
        gradient_checkpointing=gradient_checkpointing, tokens=tokens, accumulation=accumulation,
        first_grads=first, offload=offload and sharded)
