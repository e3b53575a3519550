"""The Triton paged-attention kernels equal the torch reference, on the CPU under
TRITON_INTERPRET=1: K/V writes, and split-K decode attention over mixed sequence lengths, block
boundaries and grouped-query ratios 1, 3, 4 and 8."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's kernels are defined
triton = pytest.importorskip("triton", reason="Triton is not installed")

from miaotui.layers.attention import (AttentionMetadata, build_decode_batch,  # noqa: E402
                                      reference_paged_attention, write_kv_cache)
from miaotui.layers.triton_attention import paged_decode_attention, write_kv  # noqa: E402

SEQ_LENS = [1, 15, 16, 17, 33, 64, 100]  # within a block, at and past block edges, several splits


def _cache(num_blocks, block_size, kv_heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, block_size, kv_heads, dim, generator=g),
            torch.randn(num_blocks, block_size, kv_heads, dim, generator=g))


def test_write_kv_matches_torch():
    k_cache, v_cache = _cache(8, 16, 2, 32, seed=0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    key, value = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    slots = torch.tensor([3, 17, 18, 90, 127])
    write_kv(key, value, k_cache, v_cache, slots)
    write_kv_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])  # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("head_dim,blocks_per_split", [(32, 2), (24, 16)])  # several splits; a non-power-of-2 dim
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, blocks_per_split):
    block_size, num_blocks = 8, 96
    k_cache, v_cache = _cache(num_blocks, block_size, kv_heads, head_dim, seed=heads + head_dim)
    g = torch.Generator().manual_seed(1)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in SEQ_LENS]
    width = max(map(len, tables))
    block_tables = torch.zeros(len(SEQ_LENS), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    query = torch.randn(len(SEQ_LENS), heads, head_dim, generator=g)
    seq_lens = torch.tensor(SEQ_LENS)
    starts = list(range(len(SEQ_LENS) + 1))
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(SEQ_LENS), dtype=torch.int64), block_tables=block_tables,
                             seq_lens=seq_lens.to(torch.int32), query_start_loc=torch.tensor(starts, dtype=torch.int32),
                             seq_lens_list=SEQ_LENS, query_start_loc_list=starts)
    meta.decode = build_decode_batch(meta, block_size)
    expected = reference_paged_attention(query, k_cache, v_cache, meta, head_dim**-0.5)
    got = paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5,
                                 blocks_per_split=blocks_per_split)
    assert (got - expected).abs().max().item() < 1e-5


def test_engine_on_the_triton_backend_equals_the_torch_backend(tmp_path, embedded_gguf, monkeypatch):
    """The whole engine (paged writes, decode through the kernel, prompt chunks through SDPA)
    gives the same greedy tokens and logprobs with MIAOTUI_ATTENTION_BACKEND=triton."""
    from miaotui import LLM, SamplingParams
    from tests.conftest import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": [5, 9, 13]}, {"prompt_token_ids": list(range(20, 39))}]
    kwargs = dict(tokenizer=embedded_gguf, block_size=8, num_kv_blocks=96, max_num_batched_tokens=16)
    reference = LLM(str(folder), **kwargs).generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("MIAOTUI_ATTENTION_BACKEND", "triton")
    llm = LLM(str(folder), **kwargs)
    assert llm.engine.model.attention_layers()[0].backend == "triton"
    got = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(reference, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)
