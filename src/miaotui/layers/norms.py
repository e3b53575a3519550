"""Normalization layers, computed in fp32 like the Hugging Face reference."""

from __future__ import annotations

import torch
from torch import nn

from miaotui.kernels.cpu_build import cpu_op

_FUSED_RMS_NORM = getattr(torch.nn.functional, "rms_norm", None)  # torch >= 2.4


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, cpu_kernel: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # miaotui's one-pass CPU kernel (kernels/cpu_elementwise.cpp) where it is built, bound
        # once. It is as accurate as torch's ops but rounds differently in the last bit.
        self._cpu_rms_norm = cpu_op("rms_norm") if cpu_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._cpu_rms_norm is not None and x.dtype is torch.float32 and x.device.type == "cpu"
                and x.is_contiguous() and self.weight.dtype is torch.float32):
            return self._cpu_rms_norm(x, self.weight, self.eps)
        if x.dtype is torch.float32 and _FUSED_RMS_NORM is not None:
            # The same arithmetic in one kernel (the reference's weight * x.to(dtype) is a no-op
            # cast in fp32); other dtypes keep the reference's order of rounding.
            return _FUSED_RMS_NORM(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
