"""Mixture-of-experts GGUF files (Qwen3-MoE as `qwen3moe`, Mixtral as `llama` with expert
tensors), written as llama.cpp's converter writes them (experts stacked per projection):
dequantized, they match transformers' own GGUF loader (qwen3moe) or the checkpoint they were
written from (Mixtral, which that loader reads as a dense Llama); 4-bit experts stay 4-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.layers.moe import SparseMoE
from miaotui.layers.quantized import Int4Linear, Int8GroupLinear, Int8Linear
from miaotui.loader import load_model, resolve_model
from tests.conftest import make_tiny_checkpoint
from tests.gguf_writer_families import roundtrip
from tests.gguf_writer_moe import write_moe_gguf
from tests.models.test_gguf import assert_prompt_logits_match
from tests.models.test_moe import assert_top_logprobs_match, dequantized_reference

MATRICES = ("_exps.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")


def _quant(kind: str):
    return lambda name: kind if name.endswith(MATRICES) else "F32"


def _dense(path: Path):
    return load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization="none"))[0]


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_qwen3moe_file_matches_transformers_gguf_loader(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    # transformers' loader reads no expert_feed_forward_length: its default (768) must be the size.
    _, hf = make_tiny_checkpoint(tmp_path / "hf", "qwen3_moe", moe_intermediate_size=768)
    path = write_moe_gguf(tmp_path / f"q.{kind}.gguf", hf, _quant(kind), "qwen3moe")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen3MoeForCausalLM"
    model = _dense(path)
    assert len([m for m in model.modules() if isinstance(m, SparseMoE)]) == 2
    assert_prompt_logits_match(model, path, ref, 19)


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_mixtral_file_matches_its_checkpoint(tmp_path, kind):
    _, hf = make_tiny_checkpoint(tmp_path / "hf", "mixtral")
    path = write_moe_gguf(tmp_path / f"m.{kind}.gguf", hf, _quant(kind), "llama")
    ref = type(hf)(hf.config).eval()  # the checkpoint's weights as the file stores them
    with torch.no_grad():
        for name, param in ref.named_parameters():
            w = hf.state_dict()[name].numpy()
            stored = kind if (name.endswith(("proj.weight", "experts.gate_up_proj", "experts.down_proj"))
                              and ".mlp.gate" not in name) else "F32"
            param.copy_(torch.from_numpy(np.ascontiguousarray(roundtrip(w, stored))))
    model = _dense(path)
    assert type(model).__name__ == "MoEForCausalLM" and model.config.num_local_experts == 8
    assert_prompt_logits_match(model, path, ref, 19)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K", "Q8_0", "MXFP4"])
def test_quantized_experts_keep_their_precision_class(tmp_path, kind):
    """4-bit experts stay 4-bit (their own codes, on miaotui's kernels), Q8_0 and MXFP4 ones stay
    as stored (int8 codes with the file's scale per group of 32, exact for both); only the experts a token picks run; outputs equal the
    reference holding the loaded weights dequantized (Q4_K's codes are random, not the
    checkpoint's, so the checkpoint itself is no reference)."""
    from tests.gguf_writer_families import add_any
    import tests.gguf_writer_moe as writer_moe

    sizes = (dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64)
             if kind == "Q4_K" else {})  # Q4_K rows are whole super-blocks of 256
    _, hf = make_tiny_checkpoint(tmp_path / "hf", "qwen3_moe", **sizes)
    original = writer_moe.add_tensor
    writer_moe.add_tensor = add_any  # Q4_K: random blocks of each shape (the gguf package cannot write it)
    try:
        path = write_moe_gguf(tmp_path / f"q.{kind}.gguf", hf, _quant(kind), "qwen3moe")
    finally:
        writer_moe.add_tensor = original
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4, num_kv_blocks=128, max_model_len=128)
    model = llm.engine.runner.model
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    expected = Int8GroupLinear if kind in ("Q8_0", "MXFP4") else Int4Linear
    for block in blocks:
        assert all(type(e.gate_up_proj) is expected and type(e.down_proj) is expected for e in block.experts)
    if not getattr(blocks[0].experts[0].gate_up_proj, "own_kernel", False):
        pytest.skip("the reference needs miaotui's CPU kernels (whose dequantized weights are exact)")
    if expected is Int8GroupLinear:  # as stored: bit for bit the gguf package's dequantization
        dense = [m for m in _dense(path).modules() if isinstance(m, SparseMoE)]
        for ours, theirs in zip(blocks, dense):
            for e, f in zip(ours.experts, theirs.experts):
                assert torch.equal(e.gate_up_proj._dense_weight(), f.gate_up_proj.weight)
                assert torch.equal(e.down_proj._dense_weight(), f.down_proj.weight)
    ref = dequantized_reference(hf, model)
    before = [b.experts_run for b in blocks]
    prompt = [7, 100, 3, 42, 9, 250, 11]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0, logprobs=6),
                       use_tqdm=False)[0].outputs[0]
    assert all(0 < b.experts_run - s <= 8 for b, s in zip(blocks, before))
    assert_top_logprobs_match(out, ref, prompt)


@pytest.mark.parametrize("kind", ["Q6_K", "Q5_0"])
def test_k_quant_embedding_tables_stay_as_stored_and_look_up_exactly(tmp_path, kind):
    """A Q6_K / Q5_0 token_embd (llama.cpp's Q4_K_M stores the table as Q6_K) is kept as the
    file's blocks in a quantized load, not widened to fp32; a lookup gives exactly the dense
    load's rows, and the tied head is the int8 copy either way."""
    from miaotui.layers.packed import GGUFRows
    from miaotui.layers.quantized import PackedEmbedding

    import gguf

    import tests.gguf_writer_moe as writer_moe

    sizes = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64)
    _, hf = make_tiny_checkpoint(tmp_path / "hf", "qwen3_moe", tie_word_embeddings=True, **sizes)
    original = writer_moe.add_tensor

    def add(writer, target, w, quant):
        if quant != "Q6_K":
            return original(writer, target, w, quant)
        # Random Q6_K blocks (the gguf package cannot quantize to it): 210 bytes per 256 weights,
        # the block's fp16 d last, small enough for finite values.
        raw = np.random.default_rng(0).integers(0, 256, (w.shape[0], w.shape[1] // 256, 210), dtype=np.uint8)
        raw[..., 208:210] = np.full((w.shape[0], w.shape[1] // 256, 1), 0.001, np.float16).view(np.uint8)
        writer.add_tensor(target, raw.reshape(w.shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.Q6_K)

    writer_moe.add_tensor = add
    try:
        path = write_moe_gguf(tmp_path / "e.gguf", hf, lambda n: kind if n == "token_embd.weight" else
                              ("Q4_0" if n.endswith(MATRICES) else "F32"), "qwen3moe")
    finally:
        writer_moe.add_tensor = original
    quantized = load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization="int4"))[0]
    table = quantized.model.embed_tokens
    assert isinstance(table, PackedEmbedding) and table.kind is GGUFRows
    assert table.raw.numel() < hf.config.vocab_size * 256  # under a byte a weight, not 4
    dense = _dense(path).model.embed_tokens.weight
    ids = torch.tensor([0, 5, 255, 17, 5])
    assert torch.equal(table(ids), dense[ids])
    assert isinstance(quantized.quantized_head, Int8Linear)


def test_mxfp4_blocks_decode_bit_exactly_to_the_reference_dequantization():
    """Every e2m1 code and exponents from the smallest (e = 0, 1: ggml's half-scale special case)
    to large ones: the Int8GroupWeight's codes * scales are the gguf package's floats."""
    from types import SimpleNamespace

    import gguf
    from gguf import quants

    from miaotui.loader.gguf_quant import unpack_mxfp4

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (5, 4, 17), dtype=np.uint8)  # 5 rows of 4 blocks of 32
    raw[0, :, 0] = [0, 1, 2, 127]
    raw[1, :, 0] = [200, 140, 90, 128]
    raw = raw.reshape(5, -1)
    tensor = SimpleNamespace(name="t", tensor_type=gguf.GGMLQuantizationType.MXFP4, shape=[128, 5], data=raw)
    weight = unpack_mxfp4(tensor)
    assert weight.codes.dtype == torch.int8 and weight.codes.abs().max() <= 12
    ref = quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4).reshape(5, 128)
    assert np.array_equal(weight.dequantized().numpy(), ref)
