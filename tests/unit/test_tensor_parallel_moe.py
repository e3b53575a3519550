"""Tensor parallelism 2 for mixture-of-experts models (gloo over loopback, tiny Mixtral and
Qwen3-MoE): the same greedy ids and logprobs as one process, each rank holding half of every
expert, one all-reduce per MoE block, quantized experts sharded alike, and an expert width
that does not split named before anything runs."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.errors import UnsupportedModelError
from miaotui.layers.moe import Router, SparseMoE
from miaotui.layers.quantized import Int4Linear, Int8Linear
from miaotui.layers.tensor_parallel import RowParallelLinear
from miaotui.models.llama import LlamaMLP
from tests.conftest import make_tiny_checkpoint
from tests.unit.test_tensor_parallel import PROMPTS

KWARGS = dict(block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)


def _generate(llm: LLM, params: SamplingParams):
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


def _assert_same(single, sharded, tolerance: float) -> None:
    for a, b in zip(single, sharded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # greedy ids identical
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lp_a.keys() == lp_b.keys()  # the same top-5 tokens at every step
            for token, entry in lp_a.items():
                assert abs(entry.logprob - lp_b[token].logprob) < tolerance


def _counting_all_reduces(monkeypatch) -> list[int]:
    """Rank 0 (this process) counts its all-reduces; the worker runs the same collectives."""
    calls = [0]
    real = torch.distributed.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", counted)
    return calls


@pytest.mark.parametrize("arch,overrides", [
    ("mixtral", {}),                        # every layer MoE; expert width `intermediate_size` 32 -> 16
    ("qwen3_moe", {"mlp_only_layers": [1]}),  # layer 1 a dense MLP (intermediate_size 128); Q/K norms
])
def test_tp2_moe_matches_one_process(arch, overrides, tmp_path, embedded_gguf, monkeypatch):
    folder, hf = make_tiny_checkpoint(tmp_path / arch, arch, **overrides)
    cfg = hf.config
    kwargs = dict(tokenizer=embedded_gguf, **KWARGS)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    single = _generate(LLM(str(folder), **kwargs), params)
    tp = LLM(str(folder), tensor_parallel_size=2, **kwargs)
    try:
        layers = tp.engine.model.model.layers
        blocks = [layer.mlp for layer in layers if isinstance(layer.mlp, SparseMoE)]
        assert len(blocks) == (1 if overrides else cfg.num_hidden_layers)
        width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        for block in blocks:
            # The whole router on every rank (identical routes); half of every expert's columns.
            assert type(block.gate) is Router and block.gate.out_features == len(block.experts)
            assert block.reduce is not None and block.reduce.group is not None
            for expert in block.experts:
                assert expert.gate_up_proj.out_features == width  # 2 * width / 2 ranks
                assert type(expert.down_proj) is torch.nn.Linear  # no all-reduce of its own
                assert expert.down_proj.in_features == width // 2
        if overrides:
            dense = layers[1].mlp
            assert isinstance(dense, LlamaMLP) and isinstance(dense.down_proj, RowParallelLinear)
            assert dense.intermediate == cfg.intermediate_size // 2
        calls = _counting_all_reduces(monkeypatch)
        one_step = tp.generate({"prompt_token_ids": list(range(40, 64))}, SamplingParams(max_tokens=1),
                               use_tqdm=False)
        # One step (a 24-token prompt, under the step budget) runs many experts, yet reduces only
        # for the embedding and, per layer, the attention's O projection and the MLP (one per MoE block).
        assert blocks[0].experts_run > 2
        assert calls[0] == 1 + 2 * cfg.num_hidden_layers and len(one_step[0].outputs[0].token_ids) == 1
        monkeypatch.undo()
        sharded = _generate(tp, params)
    finally:
        tp.shutdown()
    _assert_same(single, sharded, 1e-5)  # fp32 rounding only


@pytest.mark.parametrize("mode,linear", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_tp2_quantized_experts(mode, linear, tmp_path, embedded_gguf):
    """Each rank quantizes its shard, as dense layers do. Expert width 64: each rank's down
    projection has 32 input columns, one int4 group, so int4 groups are the unsharded model's
    and the logits match it to fp32 rounding; per-row int8 scales span each rank's half of a
    down row, not the whole row, so int8 matches only to its quantization error."""
    folder, _ = make_tiny_checkpoint(tmp_path / "mixtral", "mixtral", intermediate_size=64)
    kwargs = dict(tokenizer=embedded_gguf, quantization=mode, **KWARGS)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    single = _generate(LLM(str(folder), **kwargs), params)
    tp = LLM(str(folder), tensor_parallel_size=2, **kwargs)
    try:
        for block in tp.engine.model.moe_blocks():
            assert type(block.gate) is Router and block.gate.weight.dtype == torch.float32  # dense router
            for expert in block.experts:
                assert isinstance(expert.gate_up_proj, linear) and isinstance(expert.down_proj, linear)
                assert (expert.gate_up_proj.out_features, expert.down_proj.in_features) == (64, 32)
        sharded = _generate(tp, params)
    finally:
        tp.shutdown()
    _assert_same(single, sharded, 1e-4 if mode == "int4" else 1e-2)  # int8 here: ~2e-3 apart


@pytest.mark.parametrize("arch,key", [("mixtral", "intermediate_size"), ("qwen3_moe", "moe_intermediate_size")])
def test_an_expert_width_that_does_not_split_is_named(arch, key, tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / arch, arch, **{key: 33})
    with pytest.raises(UnsupportedModelError, match=rf"{key} \(33, the experts' width\) is not divisible by "
                                                    r"tensor_parallel_size 2"):
        LLM(str(folder), tokenizer=embedded_gguf, num_kv_blocks=64, tensor_parallel_size=2)
