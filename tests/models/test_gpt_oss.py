"""gpt-oss beyond the shared parity suite (tests/models/test_decoder_parity.py and test_moe.py run
its tiny checkpoints in fp32): the pieces whose dtype or layout is its own, bit for bit against
transformers' classes, and the checkpoints it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from miaotui.errors import UnsupportedModelError
from miaotui.layers.activations import ClampedSwiGLU
from miaotui.layers.moe import route
from miaotui.layers.norms import Fp32ScaleRMSNorm
from miaotui.models.gpt_oss import GptOssForCausalLM
from tests.conftest import make_tiny_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_routing_is_transformers_router(dtype):
    """Top-k of the biased logits, then a softmax over the k in the logits' dtype (bf16 stays bf16)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=3)
    ref = GptOssTopKRouter(cfg).to(dtype)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    x = torch.randn(40, 32, dtype=dtype)
    _, ref_weights, ref_ids = ref(x)
    weights, ids = route(torch.nn.functional.linear(x, ref.weight, ref.bias), 3, False, softmax_after_topk=True)
    assert weights.dtype == dtype and torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)


def test_clamped_swiglu_is_transformers_gate_on_the_interleaved_layout():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=8, intermediate_size=16, num_local_experts=1, swiglu_limit=1.5)
    experts = GptOssExperts(cfg)
    gate_up = torch.randn(30, 32) * 3  # the checkpoint's columns: gate j at 2j, up j at 2j + 1
    expected = experts._apply_gate(gate_up)
    got = ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)(torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], -1))
    assert torch.equal(got, expected)


def test_norms_weight_fp32_rows_before_rounding_as_transformers():
    """transformers keeps gpt-oss's norms in fp32 and rounds weight * rows once; in bf16 that
    differs from RMSNorm's round-then-multiply, so gpt-oss uses Fp32ScaleRMSNorm."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    torch.manual_seed(0)
    weight = torch.randn(64).to(torch.bfloat16)  # a bf16 checkpoint's norm weight
    ref = GptOssRMSNorm(64, 1e-5)
    ref.weight.data = weight.float()
    ours = Fp32ScaleRMSNorm(64, 1e-5)
    ours.weight.data = weight
    x = torch.randn(50, 64).to(torch.bfloat16)
    assert torch.equal(ours(x), ref(x))


def test_mxfp4_and_bad_layer_types_are_refused(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path / "m", "gpt_oss")
    cfg = json.loads((folder / "config.json").read_text())
    from transformers import GptOssConfig

    quantized = GptOssConfig(**{**cfg, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(UnsupportedModelError, match="'mxfp4'"):
        GptOssForCausalLM.check_config(quantized)
    bad = GptOssConfig(**{**cfg, "layer_types": ["sliding_attention", "chunked_attention"] * 2})
    with pytest.raises(UnsupportedModelError, match="layer_types must name one of"):
        GptOssForCausalLM.check_config(bad)


def test_tensor_parallelism_is_refused_by_name(tmp_path):
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model

    folder, _ = make_tiny_checkpoint(tmp_path / "m", "gpt_oss")
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder)))
    with pytest.raises(UnsupportedModelError, match="tensor parallelism does not shard gpt-oss yet"):
        model.shard_for_tensor_parallel(0, 2)
