"""Paged attention: metadata for one flat batch, K/V cache writes, and two torch backends.

`reference_paged_attention` gathers each sequence's blocks and calls SDPA per sequence. It is
slow on big batches but obviously right: the oracle every faster backend is tested against.
`torch_paged_attention` (the default) runs all single-token (decode) sequences of a step in
one SDPA call over a padded gather, handling grouped-query attention by folding the query heads
of a KV head into the query-length axis instead of repeating K/V; prompt chunks use SDPA's own
GQA support (and its fused causal kernel for whole prompts).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.kernels.cpu_build import cpu_op

if TYPE_CHECKING:
    from miaotui.layers.cross_attention import CrossAttentionBatch

# (query positions [..., 1], key positions [L]) -> bias [heads, ..., L]; see layers/position_bias.py
ScoreBias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The cache dtypes miaotui's CPU decode kernel reads (kernels/cpu_attention.cpp).
CPU_DECODE_CACHE_DTYPES = (torch.float32, torch.float16)


@dataclass(slots=True)
class DecodeBatch:
    """The step's single-token sequences, gathered once per step for every layer.

    token_idx [Bd]: their rows in the flat batch. blocks [Bd * nb]: their block tables cut to
    the longest one's nb blocks, flattened (padding points at block 0 and is masked); whole
    blocks are gathered with one `index_select` (a memcpy per block, ~100x faster on CPU than
    indexing slot by slot). L = nb * block_size. mask [Bd, 1, 1, L]: True = attend.
    other_seqs: indices of the sequences with several new tokens (prompt chunks).
    """

    token_idx: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor
    other_seqs: list[int]
    seq_lens: torch.Tensor  # [Bd, 1], for sliding-window layers

    def window_mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window is None:
            return self.mask
        pos = torch.arange(self.mask.shape[-1], device=self.mask.device)[None, :]
        return self.mask & (pos > self.seq_lens - 1 - sliding_window)[:, None, None, :]


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
    decode: DecodeBatch | None = None  # set by build_decode_batch for the batched backend
    cross: CrossAttentionBatch | None = None  # encoder-decoder models: the encoder K/V of each sequence
    blocks_checked: bool = False  # block_tables checked against the cache size (check_block_tables)
    # Models with sliding-window KV groups: each window's own metadata (its slots and tables in
    # that group's block ids; the same lengths), used by the layers of that window.
    windows: dict[int, AttentionMetadata] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


class BlockTableError(MiaotuiError, IndexError):
    """A block table names a block the KV cache does not have."""


def check_block_tables(block_tables: torch.Tensor, num_blocks: int) -> None:
    """Raise BlockTableError unless every entry of block_tables is in [0, num_blocks).

    Attention gathers (and the CPU/Triton kernels read) whole blocks by these ids without a
    bounds check of their own, so a bad id reads memory outside the cache. One min/max over
    the table (one host sync on a GPU): it runs once per step, never per layer."""
    if block_tables.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(block_tables)).tolist()
    if 0 <= low and high < num_blocks:
        return
    bad = low if low < 0 else high
    row = int((block_tables == bad).any(dim=1).nonzero()[0, 0])
    raise BlockTableError(
        f"block table of sequence {row} in the batch names block {bad}, but the KV cache has "
        f"{num_blocks} blocks (ids 0..{num_blocks - 1}); the block tables and the cache the runner "
        "allocated disagree, which is a bug in the scheduler or the runner")


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


def chunk_mask(q_len: int, seq_len: int, device: torch.device, sliding_window: int | None = None,
               score_bias: ScoreBias | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The SDPA mask of a sequence's last q_len tokens over its seq_len context: causal (and
    windowed) as bool [q_len, seq_len], or with a score bias a float [heads, q_len, seq_len]."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)
    mask = k_pos[None, :] <= q_pos
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos - sliding_window
    if score_bias is None:
        return mask
    return score_bias(q_pos, k_pos).to(dtype).masked_fill(~mask, float("-inf"))


def reference_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, sliding_window: int | None = None, score_bias: ScoreBias | None = None,
) -> torch.Tensor:
    """query [T, heads, head_dim] -> output [T, heads, head_dim].

    A sequence's new tokens are the last `q_len` of its `seq_len` context; token i may attend
    to context positions <= its own (and, with a sliding window w, > its own - w). With
    `score_bias`, its value at (query position, key position) is added to the scaled scores.
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
        if q_len > 1 or (sliding_window is not None and seq_len > sliding_window) or score_bias is not None:
            mask = chunk_mask(q_len, seq_len, q.device, sliding_window, score_bias)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.squeeze(0).transpose(0, 1)
    return out


class PagedAttention(nn.Module):
    """Writes this layer's new K/V into its cache, then attends over the cached context.

    The runner binds `k_cache`/`v_cache` once (`bind_kv_cache`); they are plain attributes,
    not module state, so they never enter a state dict. `score_bias` is a plain callable too:
    a learned bias (T5) is a module owned by the model and shared by many layers, so it is
    passed here as its bound `forward`, never registered as this layer's submodule.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, score_bias: ScoreBias | None = None,
                 softcap: float | None = None, sinks: bool = False) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.score_bias = score_bias
        self.softcap = softcap  # Gemma 2's attention logit soft-capping (layers/explicit_attention.py)
        # gpt-oss's attention sinks: one learned logit per query head in every softmax's denominator
        # (layers/explicit_attention.py). The one parameter of this module, loaded as `attn.sinks`.
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        self.backend = attention_backend()
        # miaotui's CPU decode kernel (kernels/cpu_attention.cpp) where it is built; bound once.
        self._cpu_decode = cpu_op("paged_decode_attention")
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache is not bound; the model runner binds it before the first step")
        if meta.windows is not None and self.sliding_window in meta.windows:
            meta = meta.windows[self.sliding_window]  # this layer's KV group has its own tables
        if not meta.blocks_checked and not torch.compiler.is_compiling():
            # Once per step (the first layer): later layers share the step's metadata. Skipped
            # inside a compiled graph, whose steps the runner checks in build_decode_batch.
            check_block_tables(meta.block_tables, self.k_cache.shape[0])
            meta.blocks_checked = True
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self._use_triton(q):
            from miaotui.layers.triton_attention import write_kv

            write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            out = triton_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        else:
            write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            if self.softcap is not None or self.sinks is not None:
                # Neither SDPA nor the CPU decode kernel can cap scores or add a sink column.
                from miaotui.layers.explicit_attention import explicit_paged_attention

                out = explicit_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.softcap,
                                               self.sinks, self.sliding_window)
                return out.view(t, self.num_heads * self.head_dim)
            out = torch_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                                        self.score_bias, self._cpu_decode)
        return out.view(t, self.num_heads * self.head_dim)

    def _use_triton(self, q: torch.Tensor) -> bool:
        if (self.sliding_window is not None or self.score_bias is not None or self.softcap is not None
                or self.sinks is not None):
            return False  # the Triton kernels take none of these; such layers stay on torch
        if self.backend == "triton":
            return True
        return self.backend == "auto" and q.is_cuda and _triton_installed()


def build_decode_batch(meta: AttentionMetadata, block_size: int, num_blocks: int | None = None) -> DecodeBatch:
    """Precompute the decode gather of a step (once, not per layer). With `num_blocks` (the
    cache size) the step's block tables are checked here too (`check_block_tables`), which
    covers the paths that bypass PagedAttention.forward (the CPU decode stack, compiled decode)."""
    if num_blocks is not None:
        check_block_tables(meta.block_tables, num_blocks)
        meta.blocks_checked = True
    starts = meta.query_start_loc_list
    q_lens = [starts[i + 1] - starts[i] for i in range(meta.num_seqs)]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    others = [i for i, n in enumerate(q_lens) if n > 1]
    dev = meta.slot_mapping.device
    if not decode:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return DecodeBatch(empty, empty, torch.empty(0, 1, 1, 0, dtype=torch.bool, device=dev),
                           others, empty.view(0, 1))
    num_blocks = -(-max(meta.seq_lens_list[i] for i in decode) // block_size)
    rows = torch.tensor(decode, dtype=torch.int64, device=dev)
    tables = meta.block_tables.index_select(0, rows)[:, :num_blocks]
    pos = torch.arange(num_blocks * block_size, device=dev)
    seq_lens = meta.seq_lens.index_select(0, rows).to(torch.int64)[:, None]
    valid = pos[None, :] < seq_lens
    token_idx = torch.tensor([starts[i] for i in decode], dtype=torch.int64, device=dev)
    blocks = tables.to(torch.int64).contiguous().view(-1)  # contiguous: the CPU decode kernel reads it flat
    return DecodeBatch(token_idx, blocks, valid[:, None, None, :], others, seq_lens)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Decode attention. q [B, 1, H, D], k/v [B, L, KVH, D], mask [B, 1, 1, L] -> [B, 1, H, D].

    The H / KVH query heads of each KV head are folded into the query axis (one query row per
    head), so K/V are never repeated and one mask row serves them all."""
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[-2]
    group = heads // kv_heads
    # [B, Tq, KVH, G, D] -> [B, KVH, Tq * G, D]: query row t*G + g is head kv*G + g at t.
    qg = q.reshape(batch, tq, kv_heads, group, dim).movedim(1, 2).reshape(batch, kv_heads, tq * group, dim)
    out = F.scaled_dot_product_attention(qg, k.movedim(1, 2), v.movedim(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(batch, kv_heads, tq, group, dim).movedim(1, 2).reshape(batch, tq, heads, dim)


def _decode_rows(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch,
                 scale: float, sliding_window: int | None, score_bias: ScoreBias | None,
                 cpu_decode: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """All single-token sequences of the step in one SDPA call (or one call of the CPU kernel,
    which reads the paged cache in place): [Bd, H, D]."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    bd = decode.token_idx.numel()
    if cpu_decode is not None:
        q = (query if bd == query.shape[0] else query.index_select(0, decode.token_idx)).contiguous()
        return cpu_decode(q, k_cache, v_cache, decode.blocks.view(bd, -1), decode.seq_lens.view(-1), scale,
                          sliding_window or 0)
    keys = k_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype)
    values = v_cache.index_select(0, decode.blocks).view(bd, -1, kv_heads, head_dim).to(query.dtype)
    # [Bd, 1, H, D]; keys [Bd, L, KVH, D]. A pure decode step's rows are the whole batch in order.
    q = (query if bd == query.shape[0] else query.index_select(0, decode.token_idx))[:, None]
    mask = decode.window_mask(sliding_window)
    if score_bias is not None:  # per query head: [KVH, G] rows match the folded queries
        k_pos = torch.arange(mask.shape[-1], device=mask.device)
        bias = score_bias(decode.seq_lens - 1, k_pos).to(query.dtype).movedim(0, 1)  # [Bd or 1, H, L]
        bias = bias.reshape(bias.shape[0], kv_heads, -1, k_pos.numel())  # [Bd or 1, KVH, G, L]
        mask = bias.masked_fill(~mask, float("-inf"))
    return _grouped_sdpa(q, keys, values, mask, scale)[:, 0]


def _prompt_chunks(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, seqs: list[int], scale: float, sliding_window: int | None,
                   score_bias: ScoreBias | None) -> None:
    """Sequences with several new tokens, one SDPA call each, written into `out`."""
    starts = meta.query_start_loc_list
    for i in seqs:
        seq_len = meta.seq_lens_list[i]
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        keys = _gather(k_cache, meta.block_tables[i], seq_len).to(query.dtype).transpose(0, 1)[None]
        values = _gather(v_cache, meta.block_tables[i], seq_len).to(query.dtype).transpose(0, 1)[None]
        q = query[q_start:q_end].transpose(0, 1)[None]  # [1, H, q_len, D]
        # Prompt chunks: SDPA's own GQA; a whole prompt takes the fused causal kernel.
        if q_len == seq_len and sliding_window is None and score_bias is None:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = chunk_mask(q_len, seq_len, query.device, sliding_window, score_bias, query.dtype)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q_start:q_end] = o[0].transpose(0, 1)


def torch_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, sliding_window: int | None = None, score_bias: ScoreBias | None = None,
    cpu_decode: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract as the reference; decodes batched, prompt chunks one sequence at a time.
    `cpu_decode` (miaotui's paged decode kernel) takes the decode rows of causal layers (sliding
    windows included) without a score bias, with fp32 or fp16 CPU caches."""
    decode = meta.decode
    if decode is None:
        decode = build_decode_batch(meta, k_cache.shape[1])
    if not (cpu_decode is not None and score_bias is None
            and query.dtype is torch.float32 and k_cache.dtype in CPU_DECODE_CACHE_DTYPES
            and k_cache.device.type == "cpu"):
        cpu_decode = None
    if decode.token_idx.numel() == query.shape[0]:  # every row a decode, rows 0..T-1 in order
        return _decode_rows(query, k_cache, v_cache, decode, scale, sliding_window, score_bias, cpu_decode)
    out = torch.empty_like(query)
    if decode.token_idx.numel():
        out.index_copy_(0, decode.token_idx, _decode_rows(query, k_cache, v_cache, decode, scale,
                                                          sliding_window, score_bias, cpu_decode))
    _prompt_chunks(out, query, k_cache, v_cache, meta, decode.other_seqs, scale, sliding_window, score_bias)
    return out


def triton_paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode rows through the split-K Triton kernel, prompt chunks through SDPA (flash on GPUs)."""
    from miaotui.layers.triton_attention import paged_decode_attention

    decode = meta.decode
    if decode is None:
        decode = build_decode_batch(meta, k_cache.shape[1])
    out = torch.empty_like(query)
    bd = decode.token_idx.numel()
    if bd:
        rows = paged_decode_attention(query.index_select(0, decode.token_idx), k_cache, v_cache,
                                      decode.blocks.view(bd, -1), decode.seq_lens[:, 0], scale)
        out.index_copy_(0, decode.token_idx, rows)
    _prompt_chunks(out, query, k_cache, v_cache, meta, decode.other_seqs, scale, None, None)
    return out


BACKENDS = ("auto", "torch", "triton")


def attention_backend() -> str:
    """MIAOTUI_ATTENTION_BACKEND: auto (Triton on CUDA when installed, else torch), torch, triton."""
    name = os.environ.get("MIAOTUI_ATTENTION_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MIAOTUI_ATTENTION_BACKEND: must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
