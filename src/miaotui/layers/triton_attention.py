"""Triton kernels for the paged KV cache: writing new K/V, and split-K paged decode attention.

Cache layout as everywhere: [num_blocks, block_size, kv_heads, head_dim], contiguous.

`write_kv`: one program per (token, kv head) stores that head's K and V row at the token's slot.

`paged_decode_attention`: decode rows (one query token per sequence). Stage 1 has one program
per (sequence, query head, split); a split walks `blocks_per_split` KV blocks of the sequence
through its block table with an online softmax (running max m, running sum l, weighted value
accumulator) and writes (m, l, acc) for its part. Stage 2 merges the splits of each (sequence,
head): out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s. Splitting the context keeps the
GPU busy when a few long sequences decode (the split-K / flash-decoding idea). Query head h
reads KV head h // (heads / kv_heads) (grouped-query attention).

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (tests do that).
Scope: no sliding window and no score bias (ALiBi, T5); layers with those stay on the torch
backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     kv_heads: tl.constexpr, head_dim: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < head_dim
    src = (token * kv_heads + head) * head_dim + d
    dst = (slot * kv_heads + head) * head_dim + d
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + src, mask=mask), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key/value [T, kv_heads, head_dim] -> the caches at `slot_mapping` [T] (block * size + offset)."""
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    _write_kv_kernel[(tokens, kv_heads)](
        key.contiguous().to(k_cache.dtype), value.contiguous().to(v_cache.dtype), k_cache, v_cache,
        slot_mapping, kv_heads, head_dim, triton.next_power_of_2(head_dim))


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr,
                         m_ptr, l_ptr, acc_ptr, scale, max_blocks, num_splits,
                         heads: tl.constexpr, kv_heads: tl.constexpr, head_dim: tl.constexpr,
                         block_size: tl.constexpr, blocks_per_split: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // (heads // kv_heads)
    seq_len = tl.load(seq_lens_ptr + seq)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(q_ptr + (seq * heads + head) * head_dim + d, mask=d_mask, other=0.0).to(tl.float32)
    offs = tl.arange(0, block_size)
    m = -float("inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = split * blocks_per_split
    for i in range(blocks_per_split):
        logical = first + i
        start = logical * block_size
        if start < seq_len:
            block = tl.load(tables_ptr + seq * max_blocks + logical).to(tl.int64)  # offsets pass 2^31 in big caches
            pos = start + offs
            valid = pos < seq_len
            rows = ((block * block_size + offs) * kv_heads + kv_head) * head_dim
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale
            scores = tl.where(valid, scores, -float("inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            l = l * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
    out = (seq * heads + head) * num_splits + split
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_ptr + out * head_dim + d, acc, mask=d_mask)


@triton.jit
def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, head_dim: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # sequence * heads + head
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    m = tl.load(m_ptr + row * num_splits + s, mask=s_mask, other=-float("inf"))
    l = tl.load(l_ptr + row * num_splits + s, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Splits past the end of a short sequence saw no key: m = -inf, weight 0 (not NaN).
    w = tl.where(m > -float("inf"), tl.exp(m - m_max), 0.0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    acc = tl.load(acc_ptr + (row * num_splits + s)[:, None] * head_dim + d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           blocks_per_split: int = 16) -> torch.Tensor:
    """query [B, heads, head_dim] (one token per sequence, at position seq_len - 1) -> [B, heads,
    head_dim]. block_tables [B, max_blocks] int, seq_lens [B] int (context including the token)."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    out = torch.empty_like(query)
    if batch == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    max_blocks = tables.shape[1]
    num_splits = triton.cdiv(max_blocks, blocks_per_split)
    dev = query.device
    m = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=dev)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, heads, num_splits)](
        query.contiguous(), k_cache, v_cache, tables, seq_lens.to(torch.int32).contiguous(), m, l, acc,
        scale, max_blocks, num_splits, heads, kv_heads, head_dim, block_size, blocks_per_split, block_d)
    _decode_reduce_kernel[(batch * heads,)](m, l, acc, out, num_splits, head_dim, block_d,
                                            triton.next_power_of_2(num_splits))
    return out
