"""Paged attention: metadata for one flat batch, K/V cache writes, and the torch reference backend.

The reference gathers each sequence's blocks and calls SDPA. It is slow on long batches but
obviously right, and it is the oracle that every faster backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class AttentionMetadata:
    """Where a flat batch's tokens sit. B sequences, T tokens in all.

    slot_mapping [T]: flat cache slot (block * block_size + offset) each new token's K/V goes to.
    block_tables [B, max_blocks]: each sequence's blocks, padded with 0.
    seq_lens [B]: tokens in context after this step (cached + new).
    query_start_loc [B+1]: offsets of each sequence's new tokens in the flat batch.
    The *_list twins hold the same numbers on the host so the reference backend never syncs.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens_list: list[int]
    query_start_loc_list: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V [T, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:seq_len]


def reference_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, sliding_window: int | None = None,
) -> torch.Tensor:
    """query [T, heads, head_dim] -> output [T, heads, head_dim].

    A sequence's new tokens are the last `q_len` of its `seq_len` context; token i may attend
    to context positions <= its own (and, with a sliding window w, > its own - w).
    """
    num_heads = query.shape[1]
    kv_heads = k_cache.shape[2]
    out = torch.empty_like(query)
    starts = meta.query_start_loc_list
    for i, seq_len in enumerate(meta.seq_lens_list):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = _gather(k_cache, meta.block_tables[i], seq_len)
        values = _gather(v_cache, meta.block_tables[i], seq_len)
        if kv_heads != num_heads:
            group = num_heads // kv_heads
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].transpose(0, 1).unsqueeze(0)
        k = keys.transpose(0, 1).unsqueeze(0).to(q.dtype)
        v = values.transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = None
        if q_len > 1 or (sliding_window is not None and seq_len > sliding_window):
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.squeeze(0).transpose(0, 1)
    return out


class PagedAttention(nn.Module):
    """Writes this layer's new K/V into its cache, then attends over the cached context.

    The runner binds `k_cache`/`v_cache` once (`bind_kv_cache`); they are plain attributes,
    not module state, so they never enter a state dict.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache is not bound; the model runner binds it before the first step")
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = reference_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale,
                                        self.sliding_window)
        return out.view(t, self.num_heads * self.head_dim)
