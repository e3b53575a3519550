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


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w and the layer scales by (1 + w), all in fp32 and
    rounded to the input dtype once at the end (transformers' Gemma3RMSNorm). The fp32 factor
    1 + w is made once, at the first call after loading (weights never change after that)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps)
        self._factor: torch.Tensor | None = None
        self._factor_of: tuple[int, int] | None = None  # (weight object, its storage) the factor was made from

    def factor(self) -> torch.Tensor:
        key = (id(self.weight), self.weight.data_ptr())  # a new parameter (loading) or a move (.to) remakes it
        if self._factor is None or self._factor_of != key:
            self._factor = 1.0 + self.weight.detach().float()
            self._factor_of = key
        return self._factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.factor()
        if (self._cpu_rms_norm is not None and x.dtype is torch.float32 and x.device.type == "cpu"
                and x.is_contiguous()):
            return self._cpu_rms_norm(x, factor, self.eps)
        if _FUSED_RMS_NORM is not None:
            return _FUSED_RMS_NORM(x.float(), factor.shape, factor, self.eps).to(x.dtype)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * factor).to(x.dtype)


class Fp32ScaleRMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies the normalised fp32 rows before the one rounding to the
    input dtype (transformers' GptOssRMSNorm, kept in fp32 there), where RMSNorm rounds first and
    multiplies in the input dtype. The same numbers in fp32; they differ in bf16 / fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32:
            return super().forward(x)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)
