"""How the KV cache memory is laid out over the attention layers: KV groups and their sizes.

Layers are grouped by `PagedAttention.sliding_window`, never by model family. A model whose
layers all attend alike (all full attention, or all one window) has one group holding every
layer, sized exactly as before groups existed. A model that mixes windows gets a primary group
(the full-attention layers; with none, the widest window's) that keeps every block of a request,
plus one group per other window whose tables release the blocks behind the window
(engine/window_kv.py). Block ids are per group: each group has its own K/V tensors.

Sizes, with the engine's max_num_seqs known (`max_seqs`): every window group gets what one shared
block count would give each layer (the budget over all layers' block bytes: the layout before
groups existed), capped at the most it can ever hold (max_seqs requests of `max_held_blocks`
each); the full group gets the rest. So no group holds fewer tokens than before (short requests
keep their concurrency) and the memory windows cannot use goes to long contexts. Without
`max_seqs`, or where that leaves the full group less than one max_model_len request (a budget
too small for one before groups existed), the budget is split in proportion to what one
request of max_model_len holds in each group at most, so the groups run out together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


def max_held_blocks(window: int, chunk: int, block_size: int) -> int:
    """Most blocks one request holds in a window group when each step adds <= chunk tokens:
    blocks first_needed(c) .. ceil((c + n) / bs) - 1, and ceil(x) - floor(y) <= ceil(x - y) + 1."""
    return -(-(window + chunk) // block_size) + 1


@dataclass(frozen=True, slots=True)
class KVGroup:
    """One KV group: its layers (PagedAttention modules), their window (None: full attention,
    or the primary group of an all-window model), its block count and one block's bytes."""

    window: int | None
    layers: tuple[nn.Module, ...]
    num_blocks: int
    block_bytes: int


@dataclass(frozen=True, slots=True)
class KVLayout:
    primary: KVGroup
    windows: tuple[KVGroup, ...] = ()

    @property
    def groups(self) -> tuple[KVGroup, ...]:
        return (self.primary, *self.windows)


def _block_bytes(layers, block_size: int, dtype: torch.dtype) -> int:
    per_token = sum(2 * attn.num_kv_heads * attn.head_dim for attn in layers)
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def group_layers(model: nn.Module, with_windows: bool) -> tuple[tuple[int | None, list], dict[int, list]]:
    """(primary window, its layers), {window: layers} of the window groups; no window groups
    where all layers share one window or `with_windows` is False."""
    layers = list(model.attention_layers())
    windows = {attn.sliding_window for attn in layers}
    if len(windows) == 1 or not with_windows:
        return (layers[0].sliding_window if len(windows) == 1 else None, layers), {}
    primary = None if None in windows else max(windows)
    groups: dict[int, list] = {}
    for attn in layers:
        if attn.sliding_window != primary:
            groups.setdefault(attn.sliding_window, []).append(attn)
    return (primary, [a for a in layers if a.sliding_window == primary]), dict(sorted(groups.items()))


def plan_kv_layout(model: nn.Module, block_size: int, dtype: torch.dtype, *, num_blocks: int | None,
                   budget_bytes: float, max_model_len: int, max_chunk: int, with_windows: bool = True,
                   group_blocks: tuple[int, ...] | None = None, max_seqs: int | None = None) -> KVLayout:
    """Size every group. `num_blocks` (CacheConfig.num_blocks) counts blocks of all layers: with
    window groups it is turned into the same bytes and split like `budget_bytes`. `group_blocks`
    (a tensor-parallel worker: the driver's counts, primary first) fixes each group's count."""
    (primary_window, primary_layers), window_layers = group_layers(model, with_windows)
    if group_blocks is not None:
        if len(group_blocks) != 1 + len(window_layers):
            raise ValueError(f"group_blocks: {len(group_blocks)} counts for {1 + len(window_layers)} KV groups")
        return KVLayout(
            KVGroup(primary_window, tuple(primary_layers), group_blocks[0], _block_bytes(primary_layers, block_size, dtype)),
            tuple(KVGroup(w, tuple(ls), n, _block_bytes(ls, block_size, dtype))
                  for (w, ls), n in zip(window_layers.items(), group_blocks[1:])))
    all_bytes = _block_bytes(model.attention_layers(), block_size, dtype)
    full_need = -(-max_model_len // block_size)
    if not window_layers:
        n = num_blocks if num_blocks is not None else int(budget_bytes) // all_bytes
        layout = KVLayout(KVGroup(primary_window, tuple(primary_layers), n, all_bytes))
        _check_fits(layout.primary, full_need, max_model_len)
        return layout
    budget = num_blocks * all_bytes if num_blocks is not None else budget_bytes
    primary_bytes = _block_bytes(primary_layers, block_size, dtype)
    needs = {w: min(full_need, max_held_blocks(w, max_chunk, block_size)) for w in window_layers}
    per_seq = full_need * primary_bytes + sum(needs[w] * _block_bytes(ls, block_size, dtype)
                                              for w, ls in window_layers.items())
    seqs = budget / per_seq
    shared = int(budget) // all_bytes  # blocks per layer with one count for all (no groups)
    # + 1: block 0 of a window group is the placeholder of released entries.
    counts = {w: (min(shared, max_seqs * needs[w]) if max_seqs else int(seqs * needs[w])) + 1 for w in window_layers}
    window_bytes = {w: _block_bytes(ls, block_size, dtype) for w, ls in window_layers.items()}
    primary_blocks = int(seqs * full_need)
    if max_seqs:
        rest = budget - sum(counts[w] * window_bytes[w] for w in window_layers)
        if int(rest) // primary_bytes >= full_need:
            primary_blocks = int(rest) // primary_bytes
        else:  # a budget so small that only the proportional split fits one full-length sequence
            counts = {w: int(seqs * needs[w]) + 1 for w in window_layers}
    primary = KVGroup(primary_window, tuple(primary_layers), primary_blocks, primary_bytes)
    _check_fits(primary, full_need, max_model_len)
    windows = []
    for w, ls in window_layers.items():
        group = KVGroup(w, tuple(ls), counts[w], window_bytes[w])
        _check_fits(group, needs[w] + 1, max_model_len)
        windows.append(group)
    return KVLayout(primary, tuple(windows))


def _check_fits(group: KVGroup, need: int, max_model_len: int) -> None:
    if group.num_blocks < need:
        raise ValueError(
            f"KV cache group {_name(group)} has {group.num_blocks} blocks but one sequence of "
            f"max_model_len={max_model_len} needs {need}; raise the KV cache size or lower max_model_len")


def _name(group: KVGroup) -> str:
    kind = "full attention" if group.window is None else f"sliding window {group.window}"
    return f"'{kind}' ({len(group.layers)} layers)"


def log_kv_layout(layout: KVLayout, block_size: int, max_model_len: int, dtype: torch.dtype) -> None:
    """One line per group and the binding limit: how many tokens (and full-length sequences) fit."""
    kind = str(dtype).removeprefix("torch.")
    total = sum(g.num_blocks * g.block_bytes for g in layout.groups) / 2**30
    p = layout.primary
    if not layout.windows:
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); %.1f sequences of "
                    "max_model_len=%d fit at once", p.num_blocks, block_size, p.num_blocks * block_size,
                    total, kind, p.num_blocks * block_size / max_model_len, max_model_len)
        return
    for g in layout.groups:
        held = "every block of a sequence" if g is p else f"at most ~{g.window} + a chunk tokens of a sequence"
        logger.info("KV cache group %s: %d blocks x %d tokens = %d tokens (%.2f GiB, %s), holding %s",
                    _name(g), g.num_blocks, block_size, g.num_blocks * block_size,
                    g.num_blocks * g.block_bytes / 2**30, kind, held)
    logger.info("KV cache: %.2f GiB over %d groups; the full group binds long requests: %d tokens of context, "
                "%.1f sequences of max_model_len=%d at once", total, len(layout.groups),
                p.num_blocks * block_size, p.num_blocks * block_size / max_model_len, max_model_len)
