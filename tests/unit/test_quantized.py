"""Weight-only int8/int4 layers: the kernels compute what the stored (q, scale, zero) say, the
stored weights are close to the originals, and a quantized model stays close to fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miaotui.layers.packed import INT4_GROUP
from miaotui.layers.quantized import Int4Linear, Int8Linear, quantization_supported, quantize_model

pytestmark = pytest.mark.skipif(not (quantization_supported("int4") and quantization_supported("int8")),
                                reason="this torch lacks the low-bit CPU kernels")


def _int4_dequantized(layer: Int4Linear) -> torch.Tensor:
    """The weight the int4 layer represents, recovered through the kernel itself (identity input)."""
    eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.qweight, layer.group_size,
                                                      layer.scales_and_zeros).float().t()


@pytest.mark.parametrize("shape", [(96, 64), (960, 576), (576, 1536)])
def test_int4_weights_within_half_a_step_of_the_original(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    layer = Int4Linear(w, None, kernel="torch")
    deq = _int4_dequantized(layer)
    groups = w.reshape(shape[0], -1, INT4_GROUP)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(INT4_GROUP, 1)
    # Half a quantization step, widened by the bf16 rounding of the stored scale and zero (the
    # grid shifts by up to 8 * 2^-9 of a step) and of the identity matmul's bf16 output.
    err = (deq - w).abs()
    assert (err <= step * 0.55 + deq.abs() * 2**-8 + 1e-6).all()
    assert (err / step).mean() < 0.3  # rounding to nearest, not merely bounded


def test_int4_forward_equals_bf16_matmul_of_its_weights():
    torch.manual_seed(1)
    w, b, x = torch.randn(128, 256) * 0.05, torch.randn(128), torch.randn(5, 256)
    layer = Int4Linear(w, b, kernel="torch")
    ref = (x.bfloat16().float() @ _int4_dequantized(layer).t()) + b
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (5, 128)
    assert (out - ref).abs().max() <= 0.01 * ref.abs().max()


def test_int8_forward_and_weights():
    torch.manual_seed(2)
    w, x = torch.randn(64, 96) * 0.1, torch.randn(3, 7, 96)
    layer = Int8Linear(w, None, kernel="torch")  # the fallback; the q8 kernel: test_cpu_kernels
    scale = layer.scales.float()[:, None]
    # Half a step; the row's largest weight may lose up to 127 * 2^-9 steps to bf16 scale rounding.
    assert ((layer.dequantized() - w).abs() <= scale * 0.5 + w.abs() * 2**-8).all()
    ref = x.bfloat16().float() @ layer.dequantized().t()
    out = layer(x)
    assert out.shape == (3, 7, 64) and (out - ref).abs().max() <= 0.01 * ref.abs().max()


def test_quantize_model_swaps_every_linear_and_rejects_unknown_modes(tiny_llama):
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model

    folder, _ = tiny_llama
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder), quantization="int4"))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    with pytest.raises(ValueError, match="^quantization: "):
        ModelConfig(quantization="int3")
    with pytest.raises(ValueError, match="^quantization: "):
        quantize_model(nn.Linear(4, 4), "fp8")


def forward_all_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """One whole prompt through the paged model: logits at every position [len(ids), vocab]."""
    from miaotui.config import CacheConfig, ModelConfig
    from miaotui.engine.kv_cache import KVCacheManager
    from miaotui.step_plan import ScheduledSeq, SchedulerOutput
    from miaotui.request import Request
    from miaotui.runner.model_runner import ModelRunner
    from miaotui.sampling_params import SamplingParams

    runner = ModelRunner(model, ModelConfig(), CacheConfig(num_blocks=64), max_model_len=1024)
    kv = KVCacheManager(64, 16, enable_prefix_caching=False)
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), 1024, "r")
    assert kv.allocate_slots(req, len(ids))
    inputs = runner.step_inputs(SchedulerOutput([ScheduledSeq(req, 0, len(ids))]))
    inputs.sample_rows = list(range(len(ids)))  # logits at every position, not only the last
    return runner.forward_inputs(inputs)


@pytest.mark.embedded
@pytest.mark.parametrize("mode,max_kl", [("int8", 0.02), ("int4", 0.02)])
def test_quantized_embedded_model_stays_close_to_fp32(mode, max_kl, embedded_gguf, embedded_tokenizer):
    """Next-token distributions over a chat prompt: KL(fp32 || quantized) per position stays small,
    and the greedy pick agrees with fp32 at most positions. (The first reply token of this prompt
    is a near-tie in fp32; llama.cpp's output departs there too.)"""
    from miaotui.config import ModelConfig
    from miaotui.loader import load_model, resolve_model
    from miaotui.tokenizer import chat_prompt_ids
    ids = chat_prompt_ids(embedded_tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    source = resolve_model(embedded_gguf)
    ref_model, _ = load_model(source, ModelConfig(model=embedded_gguf, quantization="none"))
    q_model, _ = load_model(source, ModelConfig(model=embedded_gguf, quantization=mode))
    ref = forward_all_logits(ref_model, ids).log_softmax(-1)
    got = forward_all_logits(q_model, ids).log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"{mode}: mean KL {kl.mean():.4f}, max KL {kl.max():.4f}, greedy agreement {agree:.3f}")
    top2 = ref[-1].topk(2).values
    print(f"fp32 margin of the first reply token: {(top2[0] - top2[1]).item():.4f} nats")
    assert kl.mean() <= max_kl and kl.max() <= 10 * max_kl and agree >= 0.9
