"""Rotary position embedding in the Hugging Face layout (rotate_half over split halves).

GGUF checkpoints store Q/K rows interleaved for llama.cpp's rotary layout; the GGUF loader
un-permutes them, so every model here uses this one layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from miaotui.errors import UnsupportedModelError


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of a config, across transformers versions (rope_parameters vs rope_scaling)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    return params


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def check_rope(hf_config: Any) -> None:
    """The config's RoPE type is one this module computes (checked before anything loads)."""
    rope_type = rope_parameters(hf_config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    import math

    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale for the config's RoPE type."""
    params = rope_parameters(hf_config)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "dynamic":
        # Dynamic NTK only changes frequencies beyond max_position_embeddings, which the
        # engine's context limit never exceeds: the base frequencies are exact here.
        return inv_freq, 1.0
    check_rope(hf_config)
    raise AssertionError(f"RoPE type {rope_type!r} is listed as supported but not computed")


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: Any, head_dim: int) -> None:
        super().__init__()
        inv_freq, scaling = compute_inv_freq(hf_config, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for `apply_rotary` at the given positions, computed in fp32 like the reference:
        cos [T, 1, head_dim] and sin [T, 1, head_dim] with its first half negated (the sign of
        rotate_half folded in once per step instead of once per layer)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = freqs.shape[-1]
        sin = emb.sin() * self.scaling
        sin[:, :half].neg_()
        return (emb.cos() * self.scaling).to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                 cpu_kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by the tables of `RotaryEmbedding.cos_sin`:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x, half) * (-1, +1).
    `cpu_kernel` (miaotui's rotary, kernels/cpu_elementwise.cpp) does it in one pass for fp32
    CPU rows: three torch kernels and a rolled copy less per layer."""
    if (cpu_kernel is not None and x.dtype is torch.float32 and x.device.type == "cpu"
            and cos.dtype is torch.float32 and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]):
        return cpu_kernel(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)
