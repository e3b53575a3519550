"""Weights as a quantized file stores them, before they become layers (layers/quantized.py).

- Int4Weight: groups of INT4_GROUP input features, w = (q - 8) * scale + zero, q in 0..15 — the
  int4 kernel's form; GGUF Q4_0 / Q4_1 / Q4_K map onto it exactly (loader/gguf_quant.py).
- Int8GroupWeight: groups of 32, w = scale * q, q in -128..127 — GGUF Q8_0 exactly. No torch kernel
  multiplies it; it serves embedding lookups, which dequantize only the rows they read.

Both have `shape`, `rows(start, length)` (a writable view: fused QKV / gate-up are filled by
rows), `copy_`, `permute_rows`, `take(ids)` (dequantized rows, fp32) and `dequantized()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

INT4_GROUP = 32
Q8_GROUP = 32
_BF16 = torch.bfloat16


class _Grouped:
    """Shared row operations of the packed weights: every field is [N, ...] along rows."""

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def shape(self) -> torch.Size:
        return self._tensors()[0].shape

    def rows(self, start: int, length: int):
        return type(self)(*(t.narrow(0, start, length) for t in self._tensors()))

    def copy_(self, other) -> None:
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine.copy_(theirs)

    def permute_rows(self, order: torch.Tensor):
        return type(self)(*(t[order] for t in self._tensors()))

    def dequantized(self) -> torch.Tensor:
        return self.take(torch.arange(self.shape[0]))

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(slots=True)
class Int4Weight(_Grouped):
    """A 4-bit weight before packing: w[n, k] = (codes[n, k] - 8) * scale[n, g] + zero[n, g] with
    g = k // INT4_GROUP. Made by `quantize_int4` from a dense weight, or by the GGUF loader straight
    from a file's Q4_0 / Q4_1 / Q4_K blocks (which are exactly of this form: no requantization)."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K / INT4_GROUP]
    zero: torch.Tensor  # float32 [N, K / INT4_GROUP]

    @classmethod
    def empty(cls, n: int, k: int) -> Int4Weight:
        return cls(torch.empty(n, k, dtype=torch.uint8), torch.empty(n, k // INT4_GROUP),
                   torch.empty(n, k // INT4_GROUP))

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        n, k = len(ids), self.codes.shape[1]
        groups = (self.codes[ids].float() - 8).view(n, k // INT4_GROUP, INT4_GROUP)
        return (groups * self.scale[ids][..., None] + self.zero[ids][..., None]).view(n, k)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP) -> Int4Weight:
    """Round a dense [N, K] weight to 4 bits per group of `group_size`, asymmetric (min..max)."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    # Scales and zeros are stored in bf16: round them first, then pick q against the rounded
    # values, so the stored (q, scale, zero) reproduce w as closely as bf16 allows.
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(_BF16).float()
    zero = (lo + 8 * scale).to(_BF16).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    return Int4Weight(q.reshape(n, k).to(torch.uint8), scale, zero)


@dataclass(slots=True)
class Int8GroupWeight(_Grouped):
    """w[n, k] = scale[n, k // 32] * codes[n, k]: GGUF Q8_0 as stored (fp16 scales widened), and
    MXFP4 exactly (codes: the doubled e2m1 values, |q| <= 12; scale: half the block's power of two)."""

    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K / Q8_GROUP]

    @classmethod
    def empty(cls, n: int, k: int) -> Int8GroupWeight:
        return cls(torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // Q8_GROUP))

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        n, k = len(ids), self.codes.shape[1]
        groups = self.codes[ids].float().view(n, k // Q8_GROUP, Q8_GROUP)
        return (groups * self.scale[ids][..., None]).view(n, k)


Q4_BLOCK_BYTES = 20  # per group of 32 weights: 16 bytes of codes, an fp16 d and an fp16 m


def q4_rows(nibbles: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The q4 layout's rows (kernels/cpu_q4.h) from nibbles uint8 [N, G, 16] and the bytes of
    d and m ([N, G * size] uint8): per row, all codes, then all d, then all m."""
    n = nibbles.shape[0]
    return torch.cat([nibbles.reshape(n, -1), d.reshape(n, -1), m.reshape(n, -1)], 1).contiguous()


@dataclass(slots=True)
class Q4Blocks(_Grouped):
    """A 4-bit weight already in the q4 layout of miaotui's kernels (kernels/cpu_q4.h) with fp16
    scales: per row, the 16 code bytes of each group of 32 (byte j holding element j low and
    j + 16 high), then the groups' d, then their m (w = q * d + m). GGUF's Q4_1 blocks hold
    exactly these bytes (d, m, codes per block), Q4_0's do with m = -8 d; the loader regroups
    them into rows while copying them out of the file: no unpacking into codes and packing back
    (loader/gguf_quant.py: q4_blocks)."""

    blocks: torch.Tensor  # uint8 [N, K / 32 * Q4_BLOCK_BYTES]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.shape[0], self.blocks.shape[1] // Q4_BLOCK_BYTES * INT4_GROUP))

    @classmethod
    def empty(cls, n: int, k: int) -> Q4Blocks:
        return cls(torch.empty(n, k // INT4_GROUP * Q4_BLOCK_BYTES, dtype=torch.uint8))

    def to_int4(self) -> Int4Weight:
        """The same weight as an Int4Weight (for torch's int4 kernel and for lookups)."""
        n, k = self.shape
        groups = k // INT4_GROUP
        qs = self.blocks[:, : groups * 16].reshape(n, groups, 16)
        d = self.blocks[:, groups * 16: groups * 18].contiguous().view(torch.float16).float()
        m = self.blocks[:, groups * 18:].contiguous().view(torch.float16).float()
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
        return Int4Weight(codes, d, m + 8 * d)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        return Q4Blocks(self.blocks[ids]).to_int4().dequantized()


@dataclass(slots=True)
class GGUFRows:
    """An embedding table kept as a GGUF file stores it (Q5_0, Q5_1, Q5_K, Q6_K: the types no
    kernel here multiplies): the raw blocks of each row, dequantized by the gguf package a row
    at a time when looked up, to exactly the values the dense path would hold. A Q6_K table of
    151,936 x 1,024 holds 128 MB this way instead of 594 MB of fp32."""

    raw: torch.Tensor  # uint8 [N, bytes per row]
    qtype: torch.Tensor  # int64 [1]: the GGMLQuantizationType

    @property
    def shape(self) -> torch.Size:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(self.qtype))]
        return torch.Size((self.raw.shape[0], self.raw.shape[1] // size * block))

    def rows(self, start: int, length: int) -> GGUFRows:
        return GGUFRows(self.raw.narrow(0, start, length), self.qtype)

    def dequantized(self) -> torch.Tensor:
        return self.take(torch.arange(self.raw.shape[0]))

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        rows = self.raw[ids].numpy()
        values = quants.dequantize(rows, GGMLQuantizationType(int(self.qtype)))
        return torch.from_numpy(values.reshape(len(ids), -1).astype("float32", copy=False))
