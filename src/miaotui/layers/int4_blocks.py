"""4-bit weights in the q4 layout of miaotui's own CPU kernels (kernels/cpu_q4.h).

A weight [N, K] becomes uint8 [N, K / 32 * B]: per row, the 16 code bytes of each of its K / 32
groups of 32 (byte j holding element j in its low nibble and j + 16 in its high one, as GGUF
stores Q4_0 / Q4_1), then the groups' scales d, then their offsets m (w = q * d + m; m = zero -
8 * scale of an Int4Weight). Scales are fp16 (B = 20, the file's own size) when fp16 holds every
d and m exactly, as it does for the Q4_0 / Q4_1 blocks of a GGUF file; otherwise fp32 (B = 24),
so the layout never rounds a weight.

Against torch's int4 kernel (bf16 activations, bf16 scales, bf16 output) this one multiplies fp32
activations by the exactly dequantized weight, so the result is the fp32 matmul's up to
summation order; steps of 1-3 rows round x to 16 bits per group of 32 first (at most 2^-16 of
the group's largest |x|, exact integer sums; see cpu_matmul.cpp). On a 2-core AVX2 machine the
int4 matmuls of a batch-1 decode step take about half the time of torch's.
"""

from __future__ import annotations

import torch

from miaotui.layers.packed import INT4_GROUP, Int4Weight, q4_rows

_HALF_CODES = INT4_GROUP // 2


def _exact_in_fp16(t: torch.Tensor) -> bool:
    half = t.to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.float(), t)


def pack_q4_blocks(weight: Int4Weight) -> tuple[torch.Tensor, bool]:
    """(blocks uint8 [N, K / 32 * B], whether the scales are fp16) of a 4-bit weight."""
    n, k = weight.shape
    groups = k // INT4_GROUP
    d = weight.scale.float()
    m = weight.zero.float() - 8 * d
    fp16 = _exact_in_fp16(d) and _exact_in_fp16(m)
    dtype = torch.float16 if fp16 else torch.float32
    codes = weight.codes.view(n, groups, INT4_GROUP)
    nibbles = codes[..., :_HALF_CODES] | (codes[..., _HALF_CODES:] << 4)  # [n, groups, 16]
    return q4_rows(nibbles, d.to(dtype).view(torch.uint8), m.to(dtype).view(torch.uint8)), fp16
