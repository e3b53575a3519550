"""Paged attention with logit soft-capping (Gemma 2): scores = cap * tanh(q.k * scale / cap).

SDPA has no hook between the product and the softmax, so these layers compute attention
explicitly, in the order of transformers' eager_attention_forward: scale, cap, mask, softmax in
fp32, then the weighted sum in the query dtype. Decode rows of a step go in one batched call
(query heads of a KV head folded into the query axis, as layers/attention.py's `_grouped_sdpa`);
prompt chunks one sequence at a time. Masks (causal, sliding window) are those of the torch
backend, so the two paths attend to exactly the same positions.
"""

from __future__ import annotations

import torch

from miaotui.layers.attention import AttentionMetadata, DecodeBatch, _gather, build_decode_batch, chunk_mask


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float, softcap: float) -> torch.Tensor:
    """q [..., Tq, D], k/v [..., L, D], mask (bool, True = attend) broadcastable to [..., Tq, L]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _decode_rows(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch,
                 scale: float, softcap: float, sliding_window: int | None) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    bd = decode.token_idx.numel()
    heads = query.shape[1]
    group = heads // kv_heads
    q = query if bd == query.shape[0] else query.index_select(0, decode.token_idx)
    keys = k_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype).movedim(1, 2)
    values = v_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype).movedim(1, 2)
    qg = q.reshape(bd, kv_heads, group, head_dim)  # [Bd, KVH, G, D]: the G heads of a KV head as query rows
    mask = decode.window_mask(sliding_window)  # [Bd, 1, 1, L]
    out = _capped_attention(qg, keys, values, mask, scale, softcap)
    return out.reshape(bd, heads, head_dim)


def softcap_paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, softcap: float,
                            sliding_window: int | None = None) -> torch.Tensor:
    """query [T, heads, head_dim] -> [T, heads, head_dim], over K/V already written to the cache."""
    decode = meta.decode
    if decode is None:
        decode = build_decode_batch(meta, k_cache.shape[1])
    if decode.token_idx.numel() == query.shape[0]:
        return _decode_rows(query, k_cache, v_cache, decode, scale, softcap, sliding_window)
    out = torch.empty_like(query)
    if decode.token_idx.numel():
        out.index_copy_(0, decode.token_idx,
                        _decode_rows(query, k_cache, v_cache, decode, scale, softcap, sliding_window))
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    starts = meta.query_start_loc_list
    for i in decode.other_seqs:
        seq_len = meta.seq_lens_list[i]
        q_start, q_end = starts[i], starts[i + 1]
        keys = _gather(k_cache, meta.block_tables[i], seq_len).to(query.dtype).transpose(0, 1)
        values = _gather(v_cache, meta.block_tables[i], seq_len).to(query.dtype).transpose(0, 1)
        if kv_heads != heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=0)
            values = values.repeat_interleave(heads // kv_heads, dim=0)
        mask = chunk_mask(q_end - q_start, seq_len, query.device, sliding_window)
        o = _capped_attention(query[q_start:q_end].transpose(0, 1), keys, values, mask, scale, softcap)
        out[q_start:q_end] = o.transpose(0, 1)
    return out
