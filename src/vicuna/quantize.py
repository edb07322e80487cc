"""Weight-only int8 quantization at load time (``--quantization int8``).

Decoding reads every weight once per step, so int8 weights (one byte each, plus one scale per output
channel) halve the bytes of a bf16 model. Activations stay in the model's dtype.

Why torch's own ``aten._weight_int8pack_mm`` and not torchao: torchao installs here without changing
torch, but its int8 weight-only path wraps each weight in a tensor subclass that runs this very CPU
kernel through Python dispatch on every call — per-op overhead is what already dominates our decode
step (issue 25) — and it is one more dependency pinned to torch versions. The op is in torch itself and
has a Meta kernel, so a compiled decode step can trace it later.

The packed kernel exists on CPU only in torch 2.13 (no CUDA dispatch key), needs the input width K to be
a multiple of 16 (other widths give wrong results or crash; probed on torch 2.13) and is a GEMV-style
kernel meant for few rows. Elsewhere — CUDA, odd widths, prefill's many rows — the layer dequantizes and
runs an ordinary matmul: exact to the same weights, memory-saving on GPU but not faster than bf16 there
(untested on a GPU so far).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import QUANTIZATION_HELP, QUANTIZATIONS  # noqa: F401 - named where the flag is (no torch there)

PACKED_MAX_ROWS = 32  # the packed kernel is a GEMV: beyond a few rows (prefill) dequantize + one GEMM wins
_PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and per-output-channel scales: y = (x @ q.T) * scale + bias."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        # A parameter (frozen), so num_parameters and .to(device) see it like any weight.
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Symmetric absmax per output row: scale = max|w| / 127, q = round(w / scale) in [-127, 127]."""
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scales.to(linear.weight.dtype), bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def uses_packed_kernel(self, x: torch.Tensor) -> bool:
        rows = x.numel() // max(x.shape[-1], 1)
        return (x.device.type == "cpu" and x.dtype in _PACKED_DTYPES and self.in_features % 16 == 0
                and 0 < rows <= PACKED_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_packed_kernel(x):
            flat = x.reshape(-1, self.in_features).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> int:
    """Replace the decoder's q/k/v/o and gate/up/down ``nn.Linear`` by :class:`Int8Linear`, in place.

    lm_head and the embeddings stay in the model dtype: they are tied in most small chat models (SmolLM2),
    so an int8 head would be a second copy next to the float embedding the lookup still needs, and the
    logits are where rounding changes which token wins. Returns how many layers were replaced.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_PROJECTIONS]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module))
    return len(targets)
