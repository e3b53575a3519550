"""`--load-format dummy`: random weights for built-in real configs, a config.json or its folder."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.errors import ModelLoadError
from miaotui.loader.dummy import BUILTIN_CONFIGS, dummy_hf_config
from tests.conftest import make_tiny_checkpoint


@pytest.mark.parametrize("name,params", [("smollm2-135m", 134_515_008), ("llama-3.2-1b", 1_235_814_400),
                                         ("llama-3.1-8b", 8_030_261_248), ("qwen2.5-0.5b", 494_032_768),
                                         ("qwen3-0.6b", 596_049_920), ("qwen3-8b", 8_190_735_360),
                                         ("gemma-3-270m", 268_098_176), ("gemma-3-1b", 999_885_952),
                                         ("gemma-2-2b", 2_614_341_888), ("smollm3-3b", 3_075_098_624)])
def test_builtin_configs_have_the_real_models_sizes(name, params):
    from miaotui.models.registry import model_class

    config = dummy_hf_config(name)
    with torch.device("meta"):
        model = model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert set(BUILTIN_CONFIGS) >= {name}


def test_config_folder_loads_random_weights_and_generates(tmp_path, embedded_gguf):
    folder, hf_model = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    llm = LLM(str(folder / "config.json"), load_format="dummy", tokenizer=embedded_gguf, num_kv_blocks=64,
              max_model_len=128)
    model = llm.engine.model
    embed = model.model.embed_tokens.weight
    assert embed.shape == hf_model.model.embed_tokens.weight.shape
    assert not torch.equal(embed, hf_model.model.embed_tokens.weight)  # not the checkpoint's weights
    assert 0.015 < embed.std().item() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_gemma_dummy_generates_with_unit_norm_factors(embedded_gguf):
    """Gemma's (1 + w) norms get w = 0 (a factor of 1, as every other norm), its layers the real
    local/global pattern, and it generates."""
    llm = LLM("gemma-3-270m", load_format="dummy", tokenizer=embedded_gguf, num_kv_blocks=64, max_model_len=128)
    model = llm.engine.model
    assert torch.equal(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers[:6]] == [512] * 5 + [None]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_unknown_dummy_model_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a built-in config"):
        dummy_hf_config(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="needs --model"):
        dummy_hf_config(None)
    with pytest.raises(ValueError, match="load_format"):
        LLM("smollm2-135m", load_format="random")
