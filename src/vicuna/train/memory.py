"""Memory per rank: estimated before anything is rented (``vicuna train --dry-run``), measured during a run.

The estimate is arithmetic on the model's shape (built on the meta device: no weights are read) and the run's
settings. Its terms, per rank, for AdamW with fp32 master weights:

- parameters 4 B, gradients 4 B, optimizer 8 B (two moments) per trainable parameter; divided by the world size
  under FSDP. Frozen (LoRA base) parameters cost only their 4 B.
- FSDP working set: the parameters and gradients FSDP gathers unsharded — the root unit (embeddings, final norm,
  and a tied ``lm_head``) for the whole step, plus two decoder layers (the running one and the prefetched one).
- activations: what autograd saves for backward, per token and decoder layer, counted op by op for a LLaMA block
  and checked against ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_train_scale.py)::

      2 RMSNorms        2 x (4h [fp32 input] + 2 x b h [normalised, output])
      attention         b (2 a + 2 a_kv) d       q, k, v as SDPA sees them and its output
      SwiGLU MLP        4 b f                     gate, SiLU(gate), up, their product

  with b the compute dtype's bytes; SDPA repeats the KV heads when it gets a mask (packing on CPU), flash-attention
  does not. The loss adds ~12 B x vocab per token (fp32 log-softmax, its gradient, the logits' gradient). With
  gradient checkpointing only each layer's input (b h per token) is kept, plus one layer recomputed in backward.
- peak = the sum: with gradient accumulation the gradients of earlier micro-batches are alive while the next one's
  activations are, so the sum is what a step reaches (a step without accumulation peaks a little lower).

Not counted: the CUDA context and allocator slack (~1-3 GB on a GPU), communication buffers, and on CPU the
interpreter and libraries (the measured figure subtracts them: RSS growth from just before the model is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 1e9


# ----------------------------------------------------------------------------- measuring


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

    @property
    def active_activations(self) -> float:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.fsdp_working + self.active_activations

    def to_dict(self) -> dict:
        return {"world_size": self.world, "sharded": self.sharded, "parameters": self.parameters,
                "trainable": self.trainable, "params_gb": self.params / GB, "grads_gb": self.grads / GB,
                "optimizer_gb": self.optimizer / GB, "fsdp_working_gb": self.fsdp_working / GB,
                "activations_gb": self.activations / GB,
                "activations_checkpointed_gb": self.activations_checkpointed / GB,
                "gradient_checkpointing": self.gradient_checkpointing, "total_gb": self.total / GB}

    def table(self) -> str:
        this = "  <- this run"
        gc = self.gradient_checkpointing
        rows = [("parameters (fp32 master)", self.params, ""), ("gradients", self.grads, ""),
                ("optimizer (AdamW moments)", self.optimizer, "")]
        if self.sharded:
            rows.append(("FSDP unsharded working set", self.fsdp_working, ""))
        rows += [("activations, no checkpointing", self.activations, "" if gc else this),
                 ("activations, gradient checkpointing", self.activations_checkpointed, this if gc else ""),
                 ("peak per rank (estimate)", self.total, "")]
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


def activation_bytes(shape: dict, tokens: int, *, compute_bytes: int, kv_repeated: bool,
                     checkpointed: bool) -> float:
    """Bytes autograd keeps for backward, at the loss (the step's high point), for ``tokens`` tokens per rank."""
    h, f, d = shape["h"], shape["f"], shape["head_dim"]
    a, kv = shape["heads"], shape["heads"] if kv_repeated else shape["kv_heads"]
    b = compute_bytes
    per_layer = 2 * (4 * h + 2 * b * h) + b * (2 * a + 2 * kv) * d + 4 * b * f
    head = 12 * shape["vocab"] + (2 if b == 2 else 0) * shape["vocab"] + 2 * (4 * h + 2 * b * h)
    kept = shape["layers"] * (b * h if checkpointed else per_layer) + (per_layer if checkpointed else 0)
    return tokens * (kept + head)


def estimate(model, config, *, world: int, sharded: bool, tokens: int, compute_bytes: int, kv_repeated: bool,
             gradient_checkpointing: bool, frozen_bytes: float = 4) -> MemoryPlan:
    """Per-rank memory of one training step of ``model`` (real or on the meta device).

    ``frozen_bytes``: bytes per frozen parameter (4 for a LoRA base in fp32, ~0.56 for QLoRA's NF4 with its scales).
    """
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    div = world if sharded else 1
    working = 0.0
    if sharded:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        in_layers = {id(p) for m in layers for p in m.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_layers)
        layer = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
        # unsharded: root params (compute dtype) + their grads (fp32) for the whole step, two layers' params, one
        # layer's grads
        working = root * (compute_bytes + 4) + layer * (2 * compute_bytes + 4)
    shape = layer_shape(config)
    kw = {"compute_bytes": compute_bytes, "kv_repeated": kv_repeated}
    return MemoryPlan(
        world=world, sharded=sharded, parameters=total, trainable=trainable,
        params=(frozen_bytes * (total - trainable) + 4 * trainable) / div,
        grads=4 * trainable / div, optimizer=8 * trainable / div, fsdp_working=working,
        activations=activation_bytes(shape, tokens, checkpointed=False, **kw),
        activations_checkpointed=activation_bytes(shape, tokens, checkpointed=True, **kw),
        gradient_checkpointing=gradient_checkpointing, tokens=tokens)
