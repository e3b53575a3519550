"""Paged attention with explicit scores, for what SDPA has no hook for between the product and
the softmax: logit soft-capping (Gemma 2: scores = cap * tanh(q.k * scale / cap)) and attention
sinks (gpt-oss: a learned logit per head that joins each softmax's denominator and attends to
nothing, so a head may put weight on no token at all).

Computed in the order of each reference's eager attention: scale, cap, mask, then for soft-capping
the softmax in fp32 (transformers' Gemma 2), for sinks the sink column appended, the row maximum
subtracted and the softmax in the scores' dtype (transformers' gpt-oss), the sink's share dropped;
then the weighted sum in the value dtype. Decode rows of a step go in one batched call (query
heads of a KV head folded into the query axis, as layers/attention.py's `_grouped_sdpa`); prompt
chunks one sequence at a time. Masks (causal, sliding window) are those of the torch backend, so
every path (prefill, decode, mixed batches) attends to exactly the same positions.
"""

from __future__ import annotations

import torch

from miaotui.layers.attention import AttentionMetadata, DecodeBatch, _gather, build_decode_batch, chunk_mask


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                        softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [..., Tq, D], k/v [..., L, D], mask (bool, True = attend) broadcastable to [..., Tq, L];
    sinks broadcastable to [..., Tq, 1] (one logit per query head) or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)
    # Every row attends to at least its own token, so the maximum is finite and no row is all -inf.
    combined = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    weights = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(weights.to(v.dtype), v)


def _decode_rows(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch,
                 scale: float, softcap: float | None, sinks: torch.Tensor | None,
                 sliding_window: int | None) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    bd = decode.token_idx.numel()
    heads = query.shape[1]
    group = heads // kv_heads
    q = query if bd == query.shape[0] else query.index_select(0, decode.token_idx)
    keys = k_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype).movedim(1, 2)
    values = v_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype).movedim(1, 2)
    qg = q.reshape(bd, kv_heads, group, head_dim)  # [Bd, KVH, G, D]: the G heads of a KV head as query rows
    mask = decode.window_mask(sliding_window)  # [Bd, 1, 1, L]
    head_sinks = None if sinks is None else sinks.reshape(1, kv_heads, group, 1)  # head kv*G + g at [kv, g]
    out = _explicit_attention(qg, keys, values, mask, scale, softcap, head_sinks)
    return out.reshape(bd, heads, head_dim)


def explicit_paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, scale: float, softcap: float | None = None,
                             sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """query [T, heads, head_dim] -> [T, heads, head_dim], over K/V already written to the cache.
    `softcap`: the soft-capping constant; `sinks` [heads]: each head's sink logit."""
    decode = meta.decode
    if decode is None:
        decode = build_decode_batch(meta, k_cache.shape[1])
    if decode.token_idx.numel() == query.shape[0]:
        return _decode_rows(query, k_cache, v_cache, decode, scale, softcap, sinks, sliding_window)
    out = torch.empty_like(query)
    if decode.token_idx.numel():
        out.index_copy_(0, decode.token_idx,
                        _decode_rows(query, k_cache, v_cache, decode, scale, softcap, sinks, sliding_window))
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    head_sinks = None if sinks is None else sinks.reshape(heads, 1, 1)
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
        o = _explicit_attention(query[q_start:q_end].transpose(0, 1), keys, values, mask, scale, softcap, head_sinks)
        out[q_start:q_end] = o.transpose(0, 1)
    return out
