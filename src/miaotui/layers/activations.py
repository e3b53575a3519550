"""Activation functions by their Hugging Face config names (`ACT2FN` keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels.cpu_build import cpu_op

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class SiluAndMul(nn.Module):
    """silu(gate) * up of a fused gate/up projection [..., 2I] (gate first), as a gated MLP
    needs. On fp32 CPU rows it is one pass of miaotui's kernel (kernels/cpu_elementwise.cpp)
    where that is built, instead of a split, a silu and a product."""

    def __init__(self) -> None:
        super().__init__()
        self._cpu_kernel = cpu_op("silu_and_mul")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if (self._cpu_kernel is not None and gate_up.dim() == 2 and gate_up.dtype is torch.float32
                and gate_up.device.type == "cpu" and gate_up.is_contiguous()):
            return self._cpu_kernel(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up of a fused gate/up projection [..., 2I] (gate first): Gemma's MLP
    (`hidden_activation` gelu_pytorch_tanh)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class ClampedSwiGLU(nn.Module):
    """gpt-oss's expert activation over a fused gate/up projection [..., 2I] (gate first):
    gate clamped above at `limit`, up clamped to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate), as transformers' GptOssExperts._apply_gate. (The
    checkpoint interleaves gate and up columns; models/gpt_oss.py splits them at load.)"""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
