"""Block ids outside the KV cache are refused with a message, never read out of bounds."""

from __future__ import annotations

import pytest
import torch

from miaotui.layers.attention import (AttentionMetadata, BlockTableError, PagedAttention, build_decode_batch,
                                      check_block_tables)

NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM = 4, 4, 2, 8


def _meta(tables: list[list[int]], seq_lens: list[int]) -> AttentionMetadata:
    starts = list(range(len(seq_lens) + 1))  # one new token per sequence: a decode step
    return AttentionMetadata(torch.zeros(len(seq_lens), dtype=torch.int64), torch.tensor(tables),
                             torch.tensor(seq_lens), torch.tensor(starts), seq_lens, starts)


def _layer() -> PagedAttention:
    attn = PagedAttention(HEADS, HEADS, DIM, DIM**-0.5)
    attn.k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM)
    attn.v_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM)
    return attn


@pytest.mark.parametrize("bad", [NUM_BLOCKS, 1000, -1, -7])
def test_a_block_id_outside_the_cache_is_named_with_the_cache_size(bad):
    with pytest.raises(BlockTableError, match=rf"sequence 1 in the batch names block {bad}, but the KV cache "
                                              rf"has {NUM_BLOCKS} blocks"):
        check_block_tables(torch.tensor([[0, 1], [2, bad]]), NUM_BLOCKS)


def test_valid_tables_pass():
    check_block_tables(torch.tensor([[0, NUM_BLOCKS - 1]]), NUM_BLOCKS)
    check_block_tables(torch.zeros(0, 0, dtype=torch.int64), NUM_BLOCKS)


def test_the_layer_checks_once_per_step_before_reading_the_cache():
    attn = _layer()
    q = torch.randn(1, HEADS * DIM)
    kv = torch.randn(1, HEADS * DIM)
    bad = _meta([[0, NUM_BLOCKS]], [5])
    bad.decode = build_decode_batch(bad, BLOCK_SIZE)
    with pytest.raises(BlockTableError, match=f"names block {NUM_BLOCKS}"):
        attn(q, kv, kv, bad)
    good = _meta([[0, 3]], [5])
    attn(q, kv, kv, good)
    assert good.blocks_checked  # the step's later layers skip the check


def test_build_decode_batch_checks_when_given_the_cache_size():
    meta = _meta([[1, 2]], [5])
    build_decode_batch(meta, BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    assert meta.blocks_checked
    with pytest.raises(BlockTableError, match=f"names block 9, but the KV cache has {NUM_BLOCKS} blocks"):
        build_decode_batch(_meta([[1, 9]], [5]), BLOCK_SIZE, num_blocks=NUM_BLOCKS)


def test_the_runner_checks_every_step_it_builds(tiny_llama):
    """The CPU decode stack and compiled decode skip the per-layer call: the runner's own
    step tensors are where their block ids are checked."""
    from miaotui import LLM
    from miaotui.runner.model_runner import StepInputs

    llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True, num_kv_blocks=8, block_size=4, max_model_len=32)
    runner = llm.engine.runner
    ok = StepInputs(input_ids=[1], positions=[0], slots=[0], block_tables=[[0]], seq_lens=[1],
                    query_start=[0, 1], sample_rows=[0])
    runner._tensors(ok)
    bad = StepInputs(input_ids=[1], positions=[4], slots=[4], block_tables=[[0, runner.num_blocks]],
                     seq_lens=[5], query_start=[0, 1], sample_rows=[0])
    with pytest.raises(BlockTableError, match=f"names block {runner.num_blocks}, but the KV cache has "
                                              f"{runner.num_blocks} blocks"):
        runner._tensors(bad)
