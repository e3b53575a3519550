"""Cross-attention of a flat decoder batch over each sequence's own encoder output.

Encoder K/V is written once per request (when its encoder runs) and only read afterwards, so it
is kept per request (`EncoderState.cross_kv`) rather than in paged blocks: a fixed-size,
read-only buffer needs no block table, no copy-on-fork and no preemption logic, and every
sequence of the request (samples, beams) shares it by reference. The price: that memory sits
outside the KV block budget (it is bounded by max_num_seqs requests' encoder lengths).

Each step the batch's encoder K/V is padded to the longest encoder input and stacked per layer
([B, S, heads, head_dim]); the stack is reused while the step's sequences are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miaotui.request import EncoderState


@dataclass(slots=True)
class CrossAttentionBatch:
    """keys/values[layer] [B, S, H, D] (zero-padded); mask [B, 1, 1, S] (True = a real encoder
    token). Queries sit in a [B, q_max] grid: flat token t goes to row `pad_index[t]` of it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    pad_index: torch.Tensor
    q_max: int


def stack_encoder_kv(states: list[EncoderState], device: torch.device
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Pad and stack the sequences' per-layer encoder K/V; returns (keys, values, mask)."""
    lengths = [s.num_tokens for s in states]
    longest = max(lengths)
    mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    keys, values = [], []
    for layer in range(len(states[0].cross_kv)):
        k0, v0 = states[0].cross_kv[layer]
        k = k0.new_zeros(len(states), longest, *k0.shape[1:])
        v = v0.new_zeros(len(states), longest, *v0.shape[1:])
        for i, state in enumerate(states):
            sk, sv = state.cross_kv[layer]
            k[i, : sk.shape[0]] = sk
            v[i, : sv.shape[0]] = sv
        keys.append(k)
        values.append(v)
    return keys, values, mask[:, None, None, :]


def query_layout(q_lens: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """(pad_index [T], q_max): where each flat token sits in a [B, q_max] query grid."""
    q_max = max(q_lens)
    index = [b * q_max + j for b, n in enumerate(q_lens) for j in range(n)]
    return torch.tensor(index, dtype=torch.int64, device=device), q_max


def cross_attention(query: torch.Tensor, batch: CrossAttentionBatch, layer: int, scale: float) -> torch.Tensor:
    """query [T, H, D] (flat decoder tokens) -> [T, H, D]; no causal mask: every decoder token
    sees its sequence's whole encoder output."""
    keys, values = batch.keys[layer], batch.values[layer]
    num_seqs, heads, dim = keys.shape[0], query.shape[1], query.shape[2]
    if batch.q_max == 1 and query.shape[0] == num_seqs:  # a pure decode step: one token each, in order
        grid = query[:, None]
    else:
        grid = query.new_zeros(num_seqs * batch.q_max, heads, dim).index_copy_(0, batch.pad_index, query)
        grid = grid.view(num_seqs, batch.q_max, heads, dim)
    out = F.scaled_dot_product_attention(grid.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=batch.mask, scale=scale)
    return out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, batch.pad_index)
