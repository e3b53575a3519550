"""Sliding-window KV groups without a model: a request's held window blocks stay bounded while
its full-attention table grows; a prefix hit is cut to what the window group still holds; the
layout splits the memory between groups and leaves single-group models as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miaotui.config import SchedulerConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.scheduler import Scheduler
from miaotui.engine.window_kv import PLACEHOLDER
from miaotui.layers.attention import PagedAttention
from miaotui.runner.kv_layout import max_held_blocks, plan_kv_layout
from tests.scheduler_harness import make_req, tokens

BS, WINDOW, BUDGET = 4, 8, 12


def _sched(num_blocks: int = 64, window_blocks: int = 64) -> tuple[Scheduler, KVCacheManager]:
    kv = KVCacheManager(num_blocks, BS, windows=((WINDOW, window_blocks),))
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=BUDGET), kv), kv


def _run(sched: Scheduler, kv: KVCacheManager, on_step=None) -> None:
    while sched.has_unfinished():
        out = sched.schedule()
        if on_step:
            on_step(out)
        sched.update(out, {s.request.request_id: 7 for s in out.seqs if s.samples})


def test_window_blocks_held_stay_bounded_while_the_full_table_grows():
    sched, kv = _sched()
    req = make_req("a", tokens(60), max_tokens=60, ignore_eos=True, max_model_len=128)
    sched.add(req)
    bound = max_held_blocks(WINDOW, BUDGET, BS)  # ceil(20 / 4) + 1 = 6
    seen = []

    def check(out):
        for s in out.seqs:
            held = kv.window_held_blocks(s.request)[0]
            assert held <= bound
            seen.append((len(s.request.block_ids), held))

    _run(sched, kv, check)
    full, held = seen[-1]
    assert full == -(-119 // BS) == 30  # 60 + 59 computed tokens: the full group keeps them all
    assert held <= bound and max(h for _, h in seen) <= bound
    assert kv.pool.num_free == 64 and kv.windows[0].pool.num_free == 63  # all back, but the placeholder


def test_a_prefix_hit_is_cut_to_the_window_the_group_still_holds():
    sched, kv = _sched()
    prompt = tokens(40)
    sched.add(make_req("a", prompt, max_tokens=1))
    _run(sched, kv)
    b = make_req("b", prompt + [99], max_tokens=1)
    hashes = kv._block_hashes(b, 10)
    group = kv.windows[0]
    assert len(kv.find_cached_prefix(b)) == 10  # every group holds its window of the 40 tokens
    # The window group loses block 9 (tokens 36..39): a 10-block hit would read it, so the hit
    # shrinks to 9 blocks, whose window (tokens 28..35) is still cached.
    group.pool._evict(group.pool.cached[hashes[9]])  # as if its free block had been reused
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 9
    sched.add(b)
    out = sched.schedule()
    assert out.seqs[0].start == 36 and b.window_block_ids[0][:first_needed(36)] == [PLACEHOLDER] * first_needed(36)
    assert all(x != PLACEHOLDER for x in b.window_block_ids[0][first_needed(36):])


def first_needed(c: int) -> int:
    return max(0, (c - WINDOW) // BS)


def test_no_hit_when_the_window_group_lost_the_whole_prefix():
    sched, kv = _sched(window_blocks=12)
    sched.add(make_req("a", tokens(40), max_tokens=1))
    _run(sched, kv)
    group = kv.windows[0]
    group.pool.allocate(group.pool.num_free)  # evicts every cached window block
    assert kv.find_cached_prefix(make_req("b", tokens(40) + [1])) == []


class _Model(nn.Module):
    def __init__(self, windows):
        super().__init__()
        self.attn = nn.ModuleList(PagedAttention(4, 2, 8, 1.0, w) for w in windows)

    def attention_layers(self):
        return list(self.attn)


def test_layout_of_single_group_models_is_unchanged():
    for windows in ([None, None], [16, 16]):
        layout = plan_kv_layout(_Model(windows), BS, torch.float32, num_blocks=50, budget_bytes=0,
                                max_model_len=128, max_chunk=32)
        assert layout.windows == () and layout.primary.num_blocks == 50
        assert len(layout.primary.layers) == 2


def test_layout_splits_the_budget_by_what_a_full_length_request_holds():
    model = _Model([16, 16, 16, None])  # 3 window layers per full one
    layer_block = 2 * 2 * 8 * BS * 4  # K and V, 2 kv heads x 8 dims, 4 tokens, fp32
    layout = plan_kv_layout(model, BS, torch.float32, num_blocks=None, budget_bytes=1000 * layer_block,
                            max_model_len=256, max_chunk=32)
    (window,) = layout.windows
    need = max_held_blocks(16, 32, BS)  # 13 blocks held of a 64-block request
    seqs = 1000 / (64 + 3 * need)
    assert window.window == 16 and len(window.layers) == 3 and len(layout.primary.layers) == 1
    assert layout.primary.num_blocks == int(seqs * 64)
    assert window.num_blocks == int(seqs * need) + 1
    used = layout.primary.num_blocks * layout.primary.block_bytes + window.num_blocks * window.block_bytes
    assert used <= 1000 * layer_block + window.block_bytes
    # Keeping every block (no groups) would fit int(1000 / 4) = 250 blocks: 3.9 sequences, not 9.
    assert layout.primary.num_blocks > 2 * 250


@pytest.mark.parametrize("max_seqs", [2, 8, 256])
def test_layout_with_max_seqs_never_holds_fewer_tokens_than_one_shared_count(max_seqs):
    """With the engine's max_num_seqs, each window group gets the blocks one shared count gives
    every layer (250 here: the layout before groups), capped at what max_seqs requests can ever
    hold there; the full group gets the rest. Short requests lose no concurrency, and memory the
    windows cannot use goes to the full group."""
    model = _Model([16, 16, 16, None])
    layer_block = 2 * 2 * 8 * BS * 4
    layout = plan_kv_layout(model, BS, torch.float32, num_blocks=None, budget_bytes=1000 * layer_block,
                            max_model_len=256, max_chunk=32, max_seqs=max_seqs)
    (window,) = layout.windows
    need = max_held_blocks(16, 32, BS)
    assert window.num_blocks == min(250, max_seqs * need) + 1
    assert layout.primary.num_blocks >= 250 - 3  # at least the shared count, less the placeholders
    used = layout.primary.num_blocks * layout.primary.block_bytes + window.num_blocks * window.block_bytes
    assert used <= 1000 * layer_block
    if max_seqs * need < 250:  # the windows need less than a shared count: the full group gains it
        assert layout.primary.num_blocks == (1000 * layer_block - window.num_blocks * window.block_bytes) // layer_block


def test_layout_refuses_a_budget_too_small_for_one_full_length_sequence():
    # The split is proportional, so the full group is the one that runs short first.
    with pytest.raises(ValueError, match="'full attention' \\(1 layers\\) has 14 blocks but one sequence"):
        plan_kv_layout(_Model([16, 16, 16, None]), BS, torch.float32, num_blocks=8,
                       budget_bytes=0, max_model_len=128, max_chunk=32)
