"""Qwen3 and SmolLM3 beyond the decoder parity suite (tests/models/test_decoder_parity.py runs their
logits, greedy ids and mixed batches against transformers): Qwen3 GGUF files (F16, Q8_0) match
transformers' GGUF loader, SmolLM3's RoPE-less layers are transformers' own, the CPU decode
stack serves Qwen3 (its Q/K norms included) and declines SmolLM3 (its kernel rotates every
layer), and unsupported configs and names fail with messages that list the new architectures."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.errors import UnsupportedModelError
from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.loader import load_model, resolve_model
from miaotui.models.llama import LlamaForCausalLM
from miaotui.models.registry import model_class
from tests.conftest import make_tiny_checkpoint
from tests.gguf_writer import write_llama_gguf
from tests.model_checks import assert_decode_stack_matches_layers
from tests.models.test_gguf import assert_prompt_logits_match

SMOLLM3_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_qwen3_gguf_logits_match_transformers_gguf_loader(tmp_path, quant):
    from transformers import AutoModelForCausalLM

    # head_dim 128 (!= 64 / 4): transformers' GGUF loader reads no head size for qwen3 and keeps
    # Qwen3Config's default of 128; we read attention.key_length, which the writer sets.
    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "qwen3", head_dim=128, tie_word_embeddings=False)
    path = write_llama_gguf(tmp_path / "qwen3.gguf", hf_model, lambda n: "F32" if "norm" in n else quant,
                            arch="qwen3")
    model, cfg = load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization="none"))
    assert cfg.model_type == "qwen3" and cfg.head_dim == 128
    attn = model.model.layers[0].self_attn
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert torch.equal(attn.q_norm.weight, ref.state_dict()["model.layers.0.self_attn.q_norm.weight"])
    torch.manual_seed(4)
    assert_prompt_logits_match(model, path, ref, 19)


def test_smollm3_rope_layers_are_transformers_own(tmp_path):
    folder, hf_model = make_tiny_checkpoint(tmp_path, "smollm3", num_hidden_layers=8, no_rope_layer_interval=4,
                                            **SMOLLM3_IDS)
    model, _ = load_model(resolve_model(str(folder)), ModelConfig(model=str(folder)))
    ours = [layer.self_attn.use_rope for layer in model.model.layers]
    assert ours == [bool(layer.self_attn.use_rope) for layer in hf_model.model.layers]
    assert ours == [True, True, True, False] * 2  # every 4th layer has no RoPE


@pytest.mark.skipif(not cpu_kernels_available(), reason="miaotui's CPU kernels do not build here")
@pytest.mark.parametrize("arch,overrides,served", [
    ("llama", {}, True),  # the control: the same int8 model shape is one the kernel serves
    ("qwen3", {"head_dim": 32}, True),  # the kernel runs the per-head Q/K norms as the layers do
    ("smollm3", {"no_rope_layer_interval": 2, **SMOLLM3_IDS}, False),
])
def test_decode_stack_serves_qk_norm_and_declines_rope_less_layers(tmp_path, embedded_gguf, arch, overrides, served):
    folder, _ = make_tiny_checkpoint(tmp_path, arch, **overrides)
    assert_decode_stack_matches_layers(folder, embedded_gguf, served)


def test_bad_no_rope_layers_fail_fast(tmp_path):
    from transformers import SmolLM3Config

    for flags in ([1, 0], [1, 0, 2]):  # one flag short; a flag that is not 0/1
        cfg = SmolLM3Config(num_hidden_layers=3, no_rope_layers=flags, layer_types=["full_attention"] * 3,
                            architectures=["SmolLM3ForCausalLM"])
        with pytest.raises(UnsupportedModelError, match=r"no_rope_layers must hold one 0/1 flag per layer \(3\)"):
            model_class(cfg).check_config(cfg)


def test_unsupported_architecture_messages_list_the_new_ones(tmp_path):
    from types import SimpleNamespace

    assert model_class(SimpleNamespace(architectures=["Qwen3ForCausalLM"])) is LlamaForCausalLM
    assert model_class(SimpleNamespace(architectures=["SmolLM3ForCausalLM"])) is LlamaForCausalLM
    with pytest.raises(UnsupportedModelError, match=r"Qwen3ForCausalLM.*SmolLM3ForCausalLM"):
        model_class(SimpleNamespace(architectures=["Qwen3NextForCausalLM"]))
    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama")
    path = write_llama_gguf(tmp_path / "falcon.gguf", hf_model, lambda n: "F32", arch="falcon")
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*supported: llama, qwen2, qwen3, qwen3moe, phi3, smollm3"):
        load_model(resolve_model(str(path)), ModelConfig(model=str(path)))
