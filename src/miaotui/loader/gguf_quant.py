"""GGUF blocks kept as stored: Q4_0, Q4_1 and Q4_K repacked into the int4 kernel's form, and
Q8_0 (34-byte blocks: fp16 d, 32 int8; w = d * q) as an Int8GroupWeight for embedding tables.

All three store groups of 32 weights as w = a * q + b with q in 0..15, which is the int4 layer's
w = (q - 8) * scale + zero with scale = a and zero = b + 8a (layers/quantized.py: Int4Weight):
- Q4_0 (18-byte blocks): fp16 d, 16 bytes of nibbles; w = d * (q - 8) -> scale d, zero 0.
- Q4_1 (20-byte blocks): fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m -> scale d, zero m + 8d.
- Q4_K (144-byte super-blocks of 256): fp16 d and dmin, 8 six-bit (sc, m) pairs, 128 bytes of
  nibbles; sub-block j: w = d * sc_j * q - dmin * m_j -> scale d * sc_j, zero 8 d sc_j - dmin m_j.
The codes move over unchanged; only the scale and zero are later rounded to bf16 for torch's kernel.
Where miaotui's q4 kernel runs, Q4_0 / Q4_1 skip the unpacking: `q4_blocks` hands over the file's
bytes regrouped into that kernel's rows (layers/packed.py: Q4Blocks), Q4_0's with m = -8 d inserted.
Nibble order: in Q4_0/Q4_1 byte i holds weights i (low) and i + 16 (high) of its block; in Q4_K
each 32-byte run holds a 64-weight chunk, low nibbles first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from miaotui.layers.packed import INT4_GROUP, Q4_BLOCK_BYTES, Q8_GROUP, Int4Weight, Int8GroupWeight, Q4Blocks

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def matrix_shape(tensor: Any) -> tuple[int, int]:
    """(rows, row length) of a GGUF matrix; a stacked one (MoE experts, [E, N, K]) as E * N rows.
    GGUF lists dims innermost first."""
    k = int(tensor.shape[0])
    return int(np.prod([int(d) for d in tensor.shape[1:]], dtype=np.int64)), k


def unpack_int4(tensor: Any) -> Int4Weight:
    """The Int4Weight of a GGUF Q4_0 / Q4_1 / Q4_K matrix [N, K] (rows as the file stores them)."""
    from gguf.quants import Q4_K

    kind = tensor.tensor_type.name
    n, k = matrix_shape(tensor)
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, -1)
    if kind == "Q4_K":
        blocks = raw.reshape(n, k // 256, 144)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [n, k/256, 1]
        dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        scale = d * sc.reshape(n, k // 256, 8).astype(np.float32)
        zero = 8 * scale - dmin * m.reshape(n, k // 256, 8).astype(np.float32)
        runs = blocks[..., 16:].reshape(n, k // 256, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        codes = runs & 0x0F  # [n, k/256, 4 chunks, 2 halves, 32] = sub-blocks in order
    elif kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(n, k // INT4_GROUP, size)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
        if kind == "Q4_0":
            scale, zero = d, np.zeros_like(d)
        else:
            m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
            scale, zero = d, m + 8 * d
        codes = _nibbles(blocks[..., size - 16:])
    else:
        raise ValueError(f"{tensor.name}: GGUF type {kind} is not a 4-bit block format ({', '.join(INT4_TYPES)})")
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(codes).reshape(n, k)),
                      torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, k // INT4_GROUP)),
                      torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32).reshape(n, k // INT4_GROUP)))


def q4_blocks(tensor: Any) -> Q4Blocks | None:
    """A GGUF Q4_1 matrix's bytes regrouped into the q4 kernel's rows (each block's d, m and
    codes moved to the row's codes, d's and m's), or a Q4_0 one's with m = -8 d inserted (exact
    in fp16); None where that would overflow fp16 (|d| > 8191)."""
    kind = tensor.tensor_type.name
    if kind not in ("Q4_0", "Q4_1"):
        raise ValueError(f"{tensor.name}: GGUF type {kind} is not Q4_0 or Q4_1")
    n, k = matrix_shape(tensor)
    groups = k // INT4_GROUP
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, groups, -1)
    rows = np.empty((n, groups * Q4_BLOCK_BYTES), dtype=np.uint8)  # the one copy out of the file's map
    rows[:, : groups * 16] = raw[..., -16:].reshape(n, -1)
    rows[:, groups * 16: groups * 18] = raw[..., 0:2].reshape(n, -1)
    if kind == "Q4_1":
        rows[:, groups * 18:] = raw[..., 2:4].reshape(n, -1)
        return Q4Blocks(torch.from_numpy(rows))
    d = raw[..., 0:2].copy().view(np.float16)
    with np.errstate(over="ignore"):
        m = (d * np.float16(-8)).astype(np.float16)
    if not np.isfinite(m).all():
        return None
    rows[:, groups * 18:] = m.view(np.uint8).reshape(n, -1)
    return Q4Blocks(torch.from_numpy(rows))


def unpack_q8_0(tensor: Any) -> Int8GroupWeight:
    """The Int8GroupWeight of a GGUF Q8_0 matrix [N, K]."""
    if tensor.tensor_type.name != "Q8_0":
        raise ValueError(f"{tensor.name}: GGUF type {tensor.tensor_type.name} is not Q8_0")
    n, k = matrix_shape(tensor)
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // Q8_GROUP, 34)
    scale = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    return Int8GroupWeight(torch.from_numpy(codes), torch.from_numpy(scale))


def unpack_mxfp4(tensor: Any) -> Int8GroupWeight:
    """A GGUF MXFP4 matrix [N, K] (or stacked experts) as an Int8GroupWeight, exactly: each block
    of 32 is an e8m0 exponent byte and 16 bytes of e2m1 nibbles (element j low, j + 16 high), and
    w = e2m1(q) * 2^(e - 127) = (2 e2m1(q)) * 2^(e - 128): the doubled values are integers."""
    from gguf.quants import MXFP4

    if tensor.tensor_type.name != "MXFP4":
        raise ValueError(f"{tensor.name}: GGUF type {tensor.tensor_type.name} is not MXFP4")
    n, k = matrix_shape(tensor)
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // Q8_GROUP, 17)
    scale = MXFP4.e8m0_to_fp32_half(blocks[..., 0].copy()).astype(np.float32)
    values = np.array(MXFP4.kvalues, dtype=np.int8)[_nibbles(blocks[..., 1:])]
    return Int8GroupWeight(torch.from_numpy(np.ascontiguousarray(values).reshape(n, k)),
                           torch.from_numpy(np.ascontiguousarray(scale)))
