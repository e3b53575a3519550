"""The batched torch paged attention equals the reference oracle on mixed batches; attention sinks
equal transformers' gpt-oss formula."""

from __future__ import annotations

import math

import pytest
import torch

from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.layers.attention import (AttentionMetadata, PagedAttention, build_decode_batch, chunk_mask,
                                      reference_paged_attention, torch_paged_attention)
from miaotui.layers.explicit_attention import explicit_paged_attention
from miaotui.layers.position_bias import AlibiBias, RelativePositionBias


def _batch(seqs: list[tuple[int, int]], block_size: int, num_blocks: int, kv_heads: int, heads: int,
           dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-seq_len // block_size))] for seq_len, _ in seqs]
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    seq_lens = [s for s, _ in seqs]
    meta = AttentionMetadata(torch.zeros(starts[-1], dtype=torch.int64), block_tables,
                             torch.tensor(seq_lens), torch.tensor(starts), seq_lens, starts)
    query = torch.randn(starts[-1], heads, dim, generator=g)
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize("kv_heads,heads", [(4, 4), (2, 6), (1, 4), (1, 8)])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_reference(kv_heads, heads, window):
    # (context length after the step, new tokens): decodes of many lengths, block boundaries,
    # a chunk after a cached prefix, a whole prompt, a one-token prompt.
    seqs = [(5, 1), (16, 1), (17, 1), (9, 4), (1, 1), (33, 33), (40, 1), (64, 7)]
    query, k_cache, v_cache, meta = _batch(seqs, 8, 64, kv_heads, heads, 16, seed=kv_heads * 10 + heads)
    expected = reference_paged_attention(query, k_cache, v_cache, meta, 0.25, window)
    meta.decode = build_decode_batch(meta, 8)
    got = torch_paged_attention(query, k_cache, v_cache, meta, 0.25, window)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.skipif(not cpu_kernels_available(),
                    reason="miaotui's CPU kernels need x86 AVX2/FMA/F16C and a C++ compiler")
@pytest.mark.parametrize("kv_heads,heads,dim", [(4, 4, 16), (2, 6, 16), (1, 8, 64), (3, 9, 64), (2, 4, 96)])
@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_cpu_decode_kernel_matches_reference(kv_heads, heads, dim, mixed, cache_dtype):
    """miaotui's paged decode kernel reads K/V in place and runs its own exp: fp32 to 1e-5. Few
    (sequence, KV head) pairs split into one task per query head; D = 96 is one 64-wide register
    block and a rest. fp16 caches (--kv-cache-dtype float16) are read widened to fp32."""
    seqs = [(5, 1), (16, 1), (17, 1), (1, 1), (40, 1), (300, 1)] + ([(9, 4), (33, 33)] if mixed else [])
    query, k_cache, v_cache, meta = _batch(seqs, 8, 96, kv_heads, heads, dim, seed=kv_heads + heads + dim)
    query = query * 3  # peaked softmaxes as well as flat ones
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    expected = reference_paged_attention(query, k_cache, v_cache, meta, dim ** -0.5)
    meta.decode = build_decode_batch(meta, 8)
    kernel = torch.ops.miaotui_cpu.paged_decode_attention.default
    got = torch_paged_attention(query, k_cache, v_cache, meta, dim ** -0.5, cpu_decode=kernel)
    assert (got - expected).abs().max().item() < 1e-5
    rows = meta.decode.token_idx  # the kernel alone on the decode rows, as the backend calls it
    direct = kernel(query[rows].contiguous(), k_cache, v_cache, meta.decode.blocks.view(len(rows), -1),
                    meta.decode.seq_lens.view(-1), dim ** -0.5)
    assert (direct - expected[rows]).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match="seq_len 9 of row 0 does not fit its 1 blocks of 8"):
        kernel(query[:1].contiguous(), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int64),
               torch.tensor([9]), 1.0)


@pytest.mark.skipif(not cpu_kernels_available(),
                    reason="miaotui's CPU kernels need x86 AVX2/FMA/F16C and a C++ compiler")
@pytest.mark.parametrize("window", [1, 7, 8, 13, 64])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_cpu_decode_kernel_sliding_window_matches_reference(window, cache_dtype):
    """With a window w the kernel attends the last w tokens only (block-aligned or not, w shorter
    and longer than a sequence) and never reads a position before them: poisoning every block
    wholly behind a row's window (NaN, as a released block's stale data could be) changes nothing."""
    seqs = [(5, 1), (16, 1), (17, 1), (40, 1), (300, 1), (9, 4)]
    query, k_cache, v_cache, meta = _batch(seqs, 8, 96, 2, 4, 64, seed=window)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    expected = reference_paged_attention(query, k_cache, v_cache, meta, 0.125, window)
    for i, seq_len in enumerate(meta.seq_lens_list):
        behind = max(seq_len - window, 0) // 8  # blocks wholly before the window
        if meta.query_start_loc_list[i + 1] - meta.query_start_loc_list[i] == 1 and behind:
            for block in meta.block_tables[i, :behind].tolist():
                k_cache[block] = float("nan")
                v_cache[block] = float("nan")
    meta.decode = build_decode_batch(meta, 8)
    kernel = torch.ops.miaotui_cpu.paged_decode_attention.default
    got = torch_paged_attention(query, k_cache, v_cache, meta, 0.125, window, cpu_decode=kernel)
    rows = meta.decode.token_idx
    assert (got[rows] - expected[rows]).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        kernel(query[:1].contiguous(), k_cache, v_cache, meta.decode.blocks.view(len(rows), -1)[:1],
               meta.decode.seq_lens.view(-1)[:1], 1.0, -1)


def _explicit_attention(query, k_cache, v_cache, meta, scale, bias_of):
    """Softmax(q.k * scale + bias_of(h, query_pos, key_pos), causal) . v, one head at a time."""
    out = torch.empty_like(query)
    block = k_cache.shape[1]
    group = query.shape[1] // k_cache.shape[2]
    for i, seq_len in enumerate(meta.seq_lens_list):
        start, end = meta.query_start_loc_list[i], meta.query_start_loc_list[i + 1]
        slots = [meta.block_tables[i, p // block] * block + p % block for p in range(seq_len)]
        keys = k_cache.view(-1, *k_cache.shape[2:])[torch.tensor(slots)]
        values = v_cache.view(-1, *v_cache.shape[2:])[torch.tensor(slots)]
        for t in range(start, end):
            pos = seq_len - (end - t)
            for h in range(query.shape[1]):
                scores = keys[: pos + 1, h // group] @ query[t, h] * scale + bias_of(h, pos, torch.arange(pos + 1))
                out[t, h] = scores.softmax(-1) @ values[: pos + 1, h // group]
    return out


def _relative_bias(heads):
    """T5's causal relative-position bias with random weights, and its value written out: the
    bucket of distance d = query - key is d itself below 8, then logarithmic (16 buckets, 64)."""
    torch.manual_seed(heads)
    module = RelativePositionBias(16, 64, heads, bidirectional=False)
    table = module.embedding.weight.detach()

    def bucket(d: int) -> int:
        return d if d < 8 else min(15, 8 + int(math.log(d / 8) / math.log(64 / 8) * 8))

    def bias_of(h, q, keys):
        return torch.stack([table[bucket(q - int(k)), h] for k in keys])

    return module.forward, bias_of


@pytest.mark.parametrize("kind", ["alibi", "t5-relative"])
@pytest.mark.parametrize("kv_heads,heads", [(4, 4), (2, 6)])
def test_score_bias_matches_reference_and_explicit_formula(kind, kv_heads, heads):
    seqs = [(5, 1), (16, 1), (17, 1), (9, 4), (1, 1), (33, 33), (40, 1), (64, 7)]
    query, k_cache, v_cache, meta = _batch(seqs, 8, 64, kv_heads, heads, 16, seed=7 + heads)
    if kind == "alibi":
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(heads)])
        bias, bias_of = AlibiBias(slopes), lambda h, q, keys: slopes[h] * keys
    else:
        bias, bias_of = _relative_bias(heads)
    expected = _explicit_attention(query, k_cache, v_cache, meta, 0.25, bias_of)
    reference = reference_paged_attention(query, k_cache, v_cache, meta, 0.25, score_bias=bias)
    meta.decode = build_decode_batch(meta, 8)
    got = torch_paged_attention(query, k_cache, v_cache, meta, 0.25, score_bias=bias)
    assert (reference - expected).abs().max().item() < 1e-5
    assert (got - expected).abs().max().item() < 1e-5
    plain = torch_paged_attention(query, k_cache, v_cache, meta, 0.25)
    assert (plain - expected).abs().max().item() > 1e-2  # the bias really changes the result


def _gpt_oss_reference(query, k_cache, v_cache, meta, scale, sinks, window):
    """transformers' own gpt-oss eager attention, one sequence at a time over the gathered cache."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    heads, kv_heads, block_size = query.shape[1], k_cache.shape[2], k_cache.shape[1]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, sinks=sinks, training=False)
    out = torch.empty_like(query)
    starts = meta.query_start_loc_list
    for i, seq_len in enumerate(meta.seq_lens_list):
        q_start, q_end = starts[i], starts[i + 1]
        blocks = meta.block_tables[i][: -(-seq_len // block_size)]
        keys = k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        values = v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        allowed = chunk_mask(q_end - q_start, seq_len, query.device, window)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        o, _ = eager_attention_forward(module, query[q_start:q_end].transpose(0, 1)[None], keys, values, mask, scale)
        out[q_start:q_end] = o[0]
    return out


@pytest.mark.parametrize("kv_heads,heads", [(4, 4), (2, 8), (1, 4)])
@pytest.mark.parametrize("window", [None, 5])
def test_sinks_match_transformers_gpt_oss_attention(kv_heads, heads, window):
    """Attention sinks (gpt-oss) on a mixed batch, through PagedAttention's explicit-score path:
    decode rows batched and prompt chunks alone equal transformers' eager formula per sequence;
    large sinks take most of the weight, so they are exercised, not negligible."""
    seqs = [(5, 1), (16, 1), (17, 1), (9, 4), (1, 1), (33, 33), (40, 1)]
    query, k_cache, v_cache, meta = _batch(seqs, 8, 64, kv_heads, heads, 16, seed=7 * heads + kv_heads)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(heads)) * 3
    expected = _gpt_oss_reference(query, k_cache, v_cache, meta, 0.25, sinks, window)
    layer = PagedAttention(heads, kv_heads, 16, 0.25, window, sinks=True)
    with torch.no_grad():
        layer.sinks.copy_(sinks)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    t = query.shape[0]
    k_new = torch.stack([k_cache.view(-1, kv_heads, 16)[s] for s in _new_slots(meta, 8)])
    v_new = torch.stack([v_cache.view(-1, kv_heads, 16)[s] for s in _new_slots(meta, 8)])
    meta.slot_mapping = torch.tensor(_new_slots(meta, 8))
    meta.decode = build_decode_batch(meta, 8)
    with torch.no_grad():
        got = layer(query.reshape(t, -1), k_new.reshape(t, -1), v_new.reshape(t, -1), meta).view_as(query)
    assert (got - expected).abs().max().item() < 1e-5
    # -inf sinks take no weight: plain softmax attention, the reference oracle.
    plain = explicit_paged_attention(query, k_cache, v_cache, meta, 0.25, sinks=torch.full((heads,), float("-inf")),
                                     sliding_window=window)
    assert (plain - reference_paged_attention(query, k_cache, v_cache, meta, 0.25, window)).abs().max().item() < 1e-5


def _new_slots(meta, block_size):
    """The cache slots of each sequence's new tokens (its last q_len positions)."""
    slots, starts = [], meta.query_start_loc_list
    for i, seq_len in enumerate(meta.seq_lens_list):
        for pos in range(seq_len - (starts[i + 1] - starts[i]), seq_len):
            slots.append(int(meta.block_tables[i][pos // block_size]) * block_size + pos % block_size)
    return slots
