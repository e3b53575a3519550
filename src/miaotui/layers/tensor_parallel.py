"""Tensor-parallel building blocks (Megatron-style) over torch.distributed.

A loaded model is sharded in place (`shard_for_tensor_parallel` of the model class): each rank
keeps a slice of every weight and the collectives below put the pieces together.
- Column-parallel: a Linear keeps some of its output rows (attention heads, MLP columns); its
  output stays sharded, no communication.
- Row-parallel: the following Linear keeps the matching input columns; partial outputs are
  summed over ranks (all-reduce), then the bias (held once) is added.
- Partial sums reduced later: a block of several row-parallel matmuls whose outputs are summed
  anyway (a mixture of experts) keeps each one's input columns (`input_parallel`, no reduce) and
  reduces the block's sum once (`AllReduce`): one collective per block, not one per matmul.
- Vocab-parallel embedding: each rank holds a contiguous range of token rows; tokens outside it
  contribute zeros, and an all-reduce completes the lookup.
- Vocab-parallel head: each rank computes the logits of its range; an all-gather joins them.
The vocabulary is padded up to a multiple of the world size; padded logits are cut off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _Collective(nn.Module):
    """A sharded layer's process group: the runner binds its step group once at start-up
    (`bind_group`), as it binds the KV cache; None means the default group."""

    group = None


def bind_group(model: nn.Module, group) -> None:
    for module in model.modules():
        if isinstance(module, _Collective):
            module.group = group


def shard_slice(size: int, rank: int, world: int, what: str) -> slice:
    """Rank's contiguous share of `size` items; `size` must split evenly."""
    if size % world:
        raise ValueError(f"tensor_parallel_size: {what} ({size}) is not divisible by {world}")
    part = size // world
    return slice(rank * part, (rank + 1) * part)


def column_parallel(linear: nn.Linear, row_slices: list[slice]) -> nn.Linear:
    """A Linear keeping only the given output rows (concatenated in order) of `linear`."""
    weight = torch.cat([linear.weight.data[s] for s in row_slices]).contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(torch.cat([linear.bias.data[s] for s in row_slices]).contiguous(),
                                requires_grad=False)
    return out


def input_parallel(linear: nn.Linear, column_slice: slice) -> nn.Linear:
    """A bias-free Linear keeping only the given input columns of `linear`: its output is this
    rank's partial sum, which the caller must all-reduce (a bias would be added once per rank)."""
    if linear.bias is not None:
        raise ValueError("input_parallel: a Linear with a bias needs RowParallelLinear (bias added once)")
    weight = linear.weight.data[:, column_slice].contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight, requires_grad=False)
    return out


class AllReduce(_Collective):
    """Sums a partial result over the ranks (in place): the one collective of a block built
    from `input_parallel` matmuls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class RowParallelLinear(_Collective):
    """y = all_reduce(x_shard @ W_shard^T) + b, for x sharded along its last dimension."""

    def __init__(self, linear: nn.Linear, column_slice: slice) -> None:
        super().__init__()
        weight = linear.weight.data[:, column_slice].contiguous()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                dtype=weight.dtype)
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _padded_rows(weight: torch.Tensor, world: int) -> torch.Tensor:
    rows = -(-weight.shape[0] // world) * world
    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


class VocabParallelEmbedding(_Collective):
    def __init__(self, embedding: nn.Embedding, rank: int, world: int) -> None:
        super().__init__()
        full = _padded_rows(embedding.weight.data, world)
        part = full.shape[0] // world
        self.start, self.end = rank * part, (rank + 1) * part
        # clone: a row slice is already contiguous, and .contiguous() would keep the whole table alive
        self.weight = nn.Parameter(full[self.start:self.end].clone(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        local = local.masked_fill(outside[..., None], 0.0)
        dist.all_reduce(local, group=self.group)
        return local


class VocabParallelHead(_Collective):
    """Logits over the whole vocabulary from each rank's slice of the head weight."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, rank: int, world: int) -> None:
        super().__init__()
        full = _padded_rows(weight, world)
        part = full.shape[0] // world
        self.vocab_size, self.world = vocab_size, world
        self.linear = nn.Linear(full.shape[1], part, bias=False, device=weight.device, dtype=weight.dtype)
        self.linear.weight = nn.Parameter(full[rank * part:(rank + 1) * part].clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.linear(hidden).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
