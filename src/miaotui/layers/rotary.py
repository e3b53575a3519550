"""Rotary position embedding in the Hugging Face layout (rotate_half over split halves).

GGUF checkpoints store Q/K rows interleaved for llama.cpp's rotary layout; the GGUF loader
un-permutes them, so every model here uses this one layout. With a `partial_rotary_factor` below 1
(Phi-4-mini) only the first `rotary_dim` channels of each head rotate; the rest pass through.
YaRN (gpt-oss) blends interpolated and original frequencies per channel and scales cos/sin by its
attention factor, as transformers' _compute_yarn_parameters.
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


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "longrope", "yarn")


def rotary_dim(hf_config: Any, head_dim: int) -> int:
    """Channels of a head that rotate: int(head_dim * partial_rotary_factor), as transformers."""
    factor = rope_parameters(hf_config).get("partial_rotary_factor",
                                            getattr(hf_config, "partial_rotary_factor", None))
    return int(head_dim * (1.0 if factor is None else float(factor)))


def _original_max_positions(hf_config: Any, params: dict[str, Any]) -> int | None:
    return params.get("original_max_position_embeddings",
                      getattr(hf_config, "original_max_position_embeddings", None))


def check_rope(hf_config: Any, head_dim: int | None = None) -> None:
    """The config's RoPE type is one this module computes, with the fields it needs (checked
    before anything loads). `head_dim` enables the checks that need it (rotary width, longrope lists)."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if head_dim is None:
        return
    dim = rotary_dim(hf_config, head_dim)
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise UnsupportedModelError(
            f"partial_rotary_factor gives {dim} rotary channels of head_dim {head_dim}; need an even count in 2..{head_dim}")
    if rope_type == "yarn" and "factor" not in params:
        raise UnsupportedModelError("yarn RoPE needs a factor in the config's rope_parameters / rope_scaling")
    if rope_type == "longrope":
        if not _original_max_positions(hf_config, params):
            raise UnsupportedModelError("longrope RoPE needs original_max_position_embeddings in the config")
        for key in ("short_factor", "long_factor"):
            factors = params.get(key)
            if not isinstance(factors, (list, tuple)) or len(factors) != dim // 2:
                raise UnsupportedModelError(
                    f"longrope {key} must be a list of {dim // 2} numbers (rotary channels / 2), got {factors!r}")


def uses_long_factors(hf_config: Any) -> bool:
    """longrope's one rule here: the long factors when the model's context window
    (max_position_embeddings, the engine's default max_model_len) exceeds
    original_max_position_embeddings, else the short ones, for every position of every sequence.
    transformers instead picks per forward call by the current length; with a paged KV cache that
    would leave K rows cached under the short factors beside new ones under the long. One fixed
    table keeps every cached K consistent (vLLM's rule, taken on the context window rather than
    --max-model-len). Sequences shorter than the original length of a long-context Phi-3 therefore
    differ from transformers by design; with max_position_embeddings <= the original length, or
    past it, they match it."""
    params = rope_parameters(hf_config)
    return int(hf_config.max_position_embeddings) > int(_original_max_positions(hf_config, params))


def _longrope(hf_config: Any, params: dict[str, Any], base: float, dim: int) -> tuple[torch.Tensor, float]:
    """transformers' _compute_longrope_parameters with the factor set of `uses_long_factors`."""
    import math

    original = int(_original_max_positions(hf_config, params))
    factor = params.get("factor")
    if factor is None:  # Phi-3: the ratio of the two lengths, not a stored factor
        factor = hf_config.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if uses_long_factors(hf_config) else "short_factor"
    ext = torch.tensor(params[key], dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * base**shape), float(scale)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    import math

    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(hf_config: Any, params: dict[str, Any], base: float, dim: int) -> tuple[torch.Tensor, float]:
    """transformers' _compute_yarn_parameters: channels that turn fewer than beta_slow times over
    the original context are interpolated (frequency / factor), those turning more than beta_fast
    times keep their frequency, a linear ramp between; cos/sin are scaled by the attention factor
    (0.1 ln(factor) + 1 unless given, or the mscale / mscale_all_dim ratio). `truncate` (default
    true; gpt-oss sets false) rounds the ramp's ends to whole channels."""
    import math

    # transformers fills a missing original length with max_position_embeddings.
    original = _original_max_positions(hf_config, params) or hf_config.max_position_embeddings
    factor = params["factor"]
    if factor is None:
        factor = hf_config.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            scale = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # the weight of the original frequency per channel
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(scale)


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
    """Inverse frequencies [rotary_dim/2] and the cos/sin scale for the config's RoPE type."""
    params = rope_parameters(hf_config)
    base = float(params["rope_theta"])
    dim = rotary_dim(hf_config, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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
    if rope_type == "longrope":
        return _longrope(hf_config, params, base, dim)
    if rope_type == "yarn":
        return _yarn(hf_config, params, base, dim)
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
        cos [T, 1, rotary_dim] and sin [T, 1, rotary_dim] with its first half negated (the sign of
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
    CPU rows: three torch kernels and a rolled copy less per layer. Tables narrower than the
    head (partial rotary) rotate its first channels and pass the rest through unchanged."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        rotated = apply_rotary(x[..., :rot].contiguous(), cos, signed_sin, cpu_kernel)
        return torch.cat([rotated, x[..., rot:]], dim=-1)
    if (cpu_kernel is not None and x.dtype is torch.float32 and x.device.type == "cpu"
            and cos.dtype is torch.float32 and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]):
        return cpu_kernel(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)
