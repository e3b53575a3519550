"""Biases added to attention scores by position: ALiBi (BLOOM) and T5's relative buckets.

A score bias is a callable `bias(q_pos, k_pos) -> [heads, *broadcast(q_pos, k_pos).shape]`
(fp32) where q_pos [..., 1] holds query positions and k_pos [L] key positions. Attention
backends add it to the scaled scores of every layer that carries one; models with learned
absolute positions (GPT-2) or rotary embeddings (Llama) have none.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AlibiBias:
    """slope_h * key position. Adding slope * (key - query) instead gives the same softmax: the
    query part is constant along a row. Not an nn.Module: the slopes are a constant on the CPU
    (built even when the model is on "meta") and follow the keys' device when used."""

    def __init__(self, slopes: torch.Tensor) -> None:
        self.slopes = slopes  # [heads] fp32

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        slopes = self.slopes.to(k_pos.device)
        return slopes.view(-1, *([1] * q_pos.dim())) * k_pos.to(slopes.dtype)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of key - query distances (Mesh TensorFlow's, as transformers computes it):
    half the buckets are exact small distances, the rest logarithmic up to max_distance; with
    `bidirectional`, keys after the query get their own half of the buckets, otherwise every
    later key maps to distance 0 (the causal mask hides them anyway)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).to(torch.long) * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    # log(0) = -inf for distance 0: that entry is masked by is_small below, as in the reference.
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias per (bucket, head). One instance serves all layers of a stack: T5
    learns it in the first layer only and reuses it in every other."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return self.embedding(buckets).float().movedim(-1, 0)  # [..., L, H] -> [H, ..., L]
