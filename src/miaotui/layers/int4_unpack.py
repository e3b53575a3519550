"""Reading torch's CPU int4 kernel layout back into dense weights, for prompt-sized matmuls.

`_weight_int4pack_mm_for_cpu` is a matrix-vector kernel: its cost grows linearly with the rows
of x (about 76 us per row for a 3072 x 576 weight on a 2-core AVX2 machine), while a dense fp32
GEMM amortises each weight over many rows (512 rows: 39 ms int4 vs 18 ms fp32 + 2.8 ms to
dequantize). So a step with many rows dequantizes the weight and multiplies densely.

The packed layout is the kernel's private business and depends on the CPU capability torch
dispatched to. For AVX2 and AVX512 it is blocked: for each block of B output rows (B = 32 or 64)
and each input feature k, B/2 bytes whose low nibbles hold rows 0..B/2-1 of the block and whose
high nibbles hold rows B/2..B-1. `packed_block_rows` finds B by packing a probe and reading it
back; any other layout returns None and the kernel is used for every step.
"""

from __future__ import annotations

import functools

import torch

from miaotui.layers.packed import INT4_GROUP

_CANDIDATE_BLOCKS = (32, 64)


def _unpack_codes_t(qweight: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Codes transposed, [k, n] fp32: element [i, b * block + j] is row b * block + j, feature i."""
    packed = qweight.view(n // block, k, block // 2).permute(1, 0, 2)  # [k, n/B, B/2]
    codes = torch.empty(k, n // block, block)
    codes[..., : block // 2] = packed & 15
    codes[..., block // 2:] = packed >> 4
    return codes.view(k, n)


@functools.lru_cache(maxsize=1)
def packed_block_rows() -> int | None:
    """The row block B of this process's int4 packing, or None if it is not a known layout."""
    pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if pack is None:
        return None
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    qweight = pack(codes, 1)
    if qweight.dtype != torch.uint8 or qweight.numel() * 2 != n * k:
        return None
    for block in _CANDIDATE_BLOCKS:
        if torch.equal(_unpack_codes_t(qweight, n, k, block).t().to(torch.int32), codes):
            return block
    return None


def dequantize_packed_t(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
                        block: int) -> torch.Tensor:
    """W^T [k, n] fp32 of a packed int4 weight: w = (q - 8) * scale + zero per group of
    INT4_GROUP input features, `scales_and_zeros` [k / group, n, 2] as the kernel reads it."""
    groups = k // INT4_GROUP
    sz = scales_and_zeros.float()  # [groups, n, 2]
    scale = sz[..., 0][:, None, :]  # [groups, 1, n]: broadcast over the group's features
    offset = (sz[..., 1] - 8 * sz[..., 0])[:, None, :]
    w_t = _unpack_codes_t(qweight, n, k, block).view(groups, INT4_GROUP, n)
    return w_t.mul_(scale).add_(offset).view(k, n)
