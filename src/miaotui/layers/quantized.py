"""Weight-only quantized linear layers on torch's low-bit CPU kernels, and the model pass that
swaps them in.

- int4: groups of 32 input features, asymmetric (w = (q - 8) * scale + zero, q in 0..15), packed
  by `_convert_weight_to_int4pack_for_cpu` and multiplied by `_weight_int4pack_mm_for_cpu`.
- int8: one symmetric scale per output row, multiplied by `_weight_int8pack_mm`.

Both kernels run far faster with bf16 activations than fp32 ones on CPU (measured on a 2-core
AVX2 machine, all matmuls of a SmolLM2-135M decode step: int4 8.9 ms with bf16 activations vs
125 ms with fp32), so activations are cast to bf16 around the matmul and back; the rest of the
model keeps its dtype. The head (logits) is quantized to int8, never int4: it decides every token.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from miaotui.config import QUANTIZATIONS

logger = logging.getLogger("miaotui")

INT4_GROUP = 32
_ACT_DTYPE = torch.bfloat16


def quantization_supported(mode: str) -> bool:
    ops = torch.ops.aten
    if mode == "int4":
        return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    if mode == "int8":
        return hasattr(ops, "_weight_int8pack_mm")
    return mode == "none"


class _WeightOnlyLinear(nn.Module):
    """y = x W^T + b with W stored low-bit: activations go to bf16 for the kernel and back."""

    out_features: int

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # [M, K] bf16 -> [M, N] bf16
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]).to(_ACT_DTYPE))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(_WeightOnlyLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        w = weight.detach().float()
        # Scales are stored in bf16: round first, then quantize against the rounded scale.
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(_ACT_DTYPE).float()
        self.out_features, self.in_features = w.shape
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(_ACT_DTYPE))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2d, self.qweight, self.scales)


class Int4Linear(_WeightOnlyLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = INT4_GROUP) -> None:
        super().__init__(bias)
        w = weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
        groups = w.reshape(n, k // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        # Scales and zeros are stored in bf16: round them first, then pick q against the rounded
        # values, so the stored (q, scale, zero) reproduce w as closely as bf16 allows.
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(_ACT_DTYPE).float()
        zero = (lo + 8 * scale).to(_ACT_DTYPE).float()
        q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32)
        self.out_features, self.in_features, self.group_size = n, k, group_size
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1))
        # [k / group, n, 2]: the layout the kernel reads.
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(_ACT_DTYPE))

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.qweight, self.group_size, self.scales_and_zeros)


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "int4" and linear.in_features % INT4_GROUP == 0:
        return Int4Linear(linear.weight, linear.bias)
    return Int8Linear(linear.weight, linear.bias)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap every nn.Linear of a loaded CPU model for its `mode` twin; the head goes to int8.

    A tied head keeps the embedding table for lookups and gets its own int8 copy for logits."""
    if mode == "none":
        return model
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
    if not quantization_supported(mode):
        raise ValueError(f"quantization: {mode} needs torch's low-bit CPU kernels, which torch "
                         f"{torch.__version__} lacks")
    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        is_head = name.split(".")[0] == "lm_head"  # the head itself, or a tensor-parallel head's linear
        setattr(parent, attr, Int8Linear(linear.weight, linear.bias) if is_head else _quantized(linear, mode))
    if getattr(model, "tie_word_embeddings", False):
        model.quantized_head = Int8Linear(model.input_embeddings().weight, None)
    logger.info("quantized %d linear layers to %s (head: int8)", len(swaps), mode)
    return model
