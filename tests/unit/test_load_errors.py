"""A model or tokenizer that cannot load fails at once, before any slow work (tokenizer
conversion, weight loading), with an error naming the real problem and the way out; and
skip_tokenizer_init runs a model on token ids with no tokenizer at all."""

from __future__ import annotations

import importlib.util
import json
import logging
import time

import pytest

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from miaotui.loader import default_model
from miaotui.loader.gguf import peek_architecture
from miaotui.sampling_params import BeamSearchParams
from tests.conftest import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=2)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # GGUF indexes and converted tokenizers of this file's throwaway models stay out of the user's cache.
    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def no_tokenizer_loading(monkeypatch):
    """Fail the test if any tokenizer is loaded or converted."""
    import miaotui.engine.llm_engine as engine_module
    import miaotui.tokenizer as tokenizer_module

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the error")

    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", refuse)
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", refuse)
    monkeypatch.setattr(engine_module, "load_tokenizer", refuse)


@pytest.fixture
def no_weight_loading(monkeypatch):
    import miaotui.engine.llm_engine as engine_module

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(engine_module, "load_model", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama folder (config.json + model.safetensors, no tokenizer files) and its model."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def _gguf_with_arch(path, arch, tokenizer_from):
    import gguf
    import numpy as np

    from tests.gguf_writer import copy_tokenizer, finish

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    copy_tokenizer(writer, tokenizer_from)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    return finish(writer, path)


# --- GGUF files --------------------------------------------------------------------------------
def test_unsupported_gguf_architecture_fails_fast_before_the_tokenizer(tmp_path, embedded_gguf, no_tokenizer_loading):
    """A GGUF of an architecture we do not run, with a full tokenizer (SmolLM2's 49k tokens) in its
    metadata: the error comes from the header, before the tokenizer (17 s to convert) or even the
    full metadata parse."""
    path = _gguf_with_arch(tmp_path / "mamba.gguf", "mamba9", embedded_gguf)
    assert peek_architecture(path) == "mamba9"
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError,
                       match=r"mamba\.gguf: unsupported GGUF architecture 'mamba9'; supported: llama, qwen2, qwen3, qwen3moe, phi3, "
                             r"smollm3, gemma2, gemma3, gpt2, bloom"):
        LLM(str(path))
    assert time.perf_counter() - start < 2.0


def test_unsupported_gguf_tensor_type_is_named_before_the_tokenizer(tmp_path, no_tokenizer_loading):
    from tests.gguf_writer import write_llama_gguf

    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama", intermediate_size=256)  # TQ2_0 rows of 256
    path = write_llama_gguf(tmp_path / "tq2.gguf", hf_model,
                            lambda name: "TQ2_0" if name == "blk.0.ffn_down.weight" else "F32")
    with pytest.raises(UnsupportedModelError,
                       match=r"tq2\.gguf: unsupported GGUF tensor type: tensor 'blk\.0\.ffn_down\.weight' is TQ2_0; "
                             r"supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, MXFP4 \(a file quantized"):
        LLM(str(path))


def test_gguf_without_tokenizer_metadata(tmp_path, tiny, no_weight_loading):
    from tests.gguf_writer import write_llama_gguf

    _, hf_model = tiny
    path = write_llama_gguf(tmp_path / "bare.gguf", hf_model, lambda name: "F32")
    with pytest.raises(ModelLoadError, match=r"bare\.gguf has no tokenizer in its metadata \(no tokenizer\.ggml\.tokens\); "
                                             r"pass --tokenizer PATH or --skip-tokenizer-init"):
        LLM(str(path))


def test_text_file_as_model_says_so_and_nothing_about_tokenizers(tmp_path, caplog, capfd, no_tokenizer_loading):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model\n")
    caplog.set_level(logging.DEBUG)
    capfd.readouterr()
    with pytest.raises(ModelLoadError, match=r"notes\.txt is not a GGUF file \(magic b'hell', expected b'GGUF'\) and "
                                             r"not a model folder; give a \.gguf file or a Hugging Face model folder"):
        LLM(str(text))
    printed = capfd.readouterr()
    assert "tokeniz" not in (printed.out + printed.err + caplog.text).lower()


def test_config_json_as_model_points_to_its_folder(tiny):
    folder, _ = tiny
    with pytest.raises(ModelLoadError, match="config.json is not a GGUF file .* give the model folder that holds it"):
        LLM(str(folder / "config.json"))


# --- Hugging Face folders ------------------------------------------------------------------------
def test_folder_with_weights_but_no_tokenizer_files(tiny, no_weight_loading):
    folder, _ = tiny
    message = (f"no tokenizer files in {folder} (tokenizer.json, tokenizer.model or vocab files); "
               f"pass --tokenizer PATH or --skip-tokenizer-init")
    with pytest.raises(ModelLoadError) as info:
        LLM(str(folder))
    assert str(info.value) == message
    assert "sentencepiece" not in str(info.value)


def test_folder_with_tokenizer_but_no_weights(tmp_path, no_tokenizer_loading):
    folder, _ = make_tiny_checkpoint(tmp_path / "m", "llama")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        LLM(str(folder))
    assert str(info.value) == f"no *.safetensors weights in {folder}"


def test_tokenizer_only_folder_given_as_model(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"is not a model folder: it has no config\.json; it holds tokenizer "
                                             r"files: give it as the tokenizer \(--tokenizer\)"):
        LLM(str(tmp_path))


def test_folder_of_several_ggufs_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several \.gguf files \(a\.gguf, b\.gguf\): give one of them"):
        LLM(str(tmp_path))


def test_context_length_is_checked_before_the_tokenizer(tiny, embedded_gguf, no_tokenizer_loading, no_weight_loading):
    folder, _ = tiny
    with pytest.raises(ValueError, match=r"max_model_len: 4096 exceeds the model's context window of 512 tokens; "
                                         r"give at most 512 \(--max-model-len\) or leave it unset"):
        LLM(str(folder), tokenizer=embedded_gguf, max_model_len=4096)


# --- --tokenizer -------------------------------------------------------------------------------
def test_missing_tokenizer_path_names_the_tokenizer(tiny, tmp_path, capsys):
    from miaotui.cli import main

    folder, _ = tiny
    missing = tmp_path / "nonexistent"
    with pytest.raises(ModelNotFoundError, match=f"tokenizer path not found: {missing}"):
        LLM(str(folder), tokenizer=str(missing))
    assert main(["generate", "hi", "--model", str(folder), "--tokenizer", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"miaotui: error: tokenizer path not found: {missing}" in err and "model path" not in err


def test_tokenizer_folder_without_tokenizer_files(tiny, tmp_path, no_weight_loading):
    folder, _ = tiny
    with pytest.raises(ModelLoadError, match=f"no tokenizer files in {tmp_path}"):
        LLM(str(folder), tokenizer=str(tmp_path))


# --- skip_tokenizer_init -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def untokenized(tiny):
    folder, _ = tiny
    return LLM(str(folder), skip_tokenizer_init=True, num_kv_blocks=64, max_model_len=128)


def test_skip_tokenizer_init_generates_the_same_ids(tiny, untokenized, embedded_gguf):
    folder, _ = tiny
    with_tokenizer = LLM(str(folder), tokenizer=embedded_gguf, num_kv_blocks=64, max_model_len=128)
    prompts = [{"prompt_token_ids": [1, 17, 42, 99]}, {"prompt_token_ids": [5, 6, 7]}]
    ours = untokenized.generate(prompts, GREEDY, use_tqdm=False)
    ref = with_tokenizer.generate(prompts, GREEDY, use_tqdm=False)
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].token_ids) > 0 and a.outputs[0].text == ""
        assert b.outputs[0].text != ""
        for entry in a.outputs[0].logprobs:
            assert all(lp.decoded_token is None for lp in entry.values())
        assert all(isinstance(lp.decoded_token, str) for e in b.outputs[0].logprobs for lp in e.values())
    assert untokenized.engine.tokenizer is None and untokenized.get_tokenizer() is None
    assert untokenized.engine.eos_token_ids == with_tokenizer.engine.eos_token_ids == {2}  # config.json's


def test_skip_tokenizer_init_refuses_text_stop_strings_and_chat(untokenized):
    with pytest.raises(ValueError, match=r"prompt: a text prompt needs a tokenizer.*skip_tokenizer_init / "
                                         r"--skip-tokenizer-init.*prompt_token_ids"):
        untokenized.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match=r"stop: stop strings .*--skip-tokenizer-init.*use stop_token_ids"):
        untokenized.generate({"prompt_token_ids": [1, 2]}, SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages: chat needs the model's tokenizer.*--skip-tokenizer-init"):
        untokenized.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert not untokenized.engine.has_unfinished_requests()
    out = untokenized.generate({"prompt_token_ids": [1, 2]}, SamplingParams(stop_token_ids=[3], max_tokens=3),
                               use_tqdm=False)[0]
    assert out.outputs[0].text == ""


def test_skip_tokenizer_init_beam_search_gives_ids(untokenized):
    out = untokenized.beam_search({"prompt_token_ids": [1, 2, 3]}, BeamSearchParams(beam_width=2, max_tokens=4),
                                  use_tqdm=False)[0]
    assert out.outputs[0].token_ids and out.outputs[0].text == ""


def test_gguf_without_tokenizer_runs_with_skip_tokenizer_init(tmp_path, tiny):
    from tests.gguf_writer import write_llama_gguf

    _, hf_model = tiny
    path = write_llama_gguf(tmp_path / "bare.gguf", hf_model, lambda name: "F32")
    llm = LLM(str(path), skip_tokenizer_init=True, num_kv_blocks=32, max_model_len=64, quantization="none")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""


@pytest.fixture
def no_embedded_model(monkeypatch):
    monkeypatch.delenv("MIAOTUI_MODEL", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.EMBEDDED_PACKAGE else real(name, *a))


def test_dummy_load_needs_no_tokenizer_nor_embedded_model(tiny, no_embedded_model):
    folder, _ = tiny
    llm = LLM(str(folder / "config.json"), load_format="dummy", skip_tokenizer_init=True, num_kv_blocks=32,
              max_model_len=64)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""
    assert llm.engine.eos_token_ids == {2}


def test_dummy_load_without_a_tokenizer_names_both_ways_out(tiny, no_embedded_model):
    folder, _ = tiny
    with pytest.raises(ModelNotFoundError, match=r"--load-format dummy takes its tokenizer from --tokenizer or the "
                                                 r"default model.*pass --tokenizer PATH or --skip-tokenizer-init"):
        LLM(str(folder / "config.json"), load_format="dummy")


def test_dummy_load_with_default_model_pointing_nowhere(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    monkeypatch.setenv("MIAOTUI_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match=r"--load-format dummy takes its tokenizer .*model path not found"):
        LLM(str(folder / "config.json"), load_format="dummy")
    llm = LLM(str(folder / "config.json"), load_format="dummy", skip_tokenizer_init=True, num_kv_blocks=16,
              max_model_len=32)
    assert llm.engine.tokenizer is None


def test_skip_tokenizer_init_flag_and_config():
    from miaotui.cli import build_parser
    from miaotui.engine_args import model_and_cache_configs

    args = build_parser().parse_args(["generate", "hi", "--skip-tokenizer-init"])
    assert model_and_cache_configs(args)[0].skip_tokenizer_init is True
    args = build_parser().parse_args(["generate", "hi"])
    assert model_and_cache_configs(args)[0].skip_tokenizer_init is False
    with pytest.raises(ValueError, match="skip_tokenizer_init: must be true or false"):
        ModelConfig(skip_tokenizer_init="yes")


def test_unsupported_hf_architecture_is_named_before_the_tokenizer(tmp_path, embedded_gguf, no_tokenizer_loading):
    folder, _ = make_tiny_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture: FalconForCausalLM"):
        LLM(str(folder), tokenizer=embedded_gguf)


def test_unsupported_rope_type_is_named_before_the_tokenizer(tmp_path, embedded_gguf, no_tokenizer_loading,
                                                             no_weight_loading):
    folder, _ = make_tiny_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    rope = {"rope_type": "ntk_by_parts", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
    cfg["rope_scaling"] = cfg["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="RoPE type 'ntk_by_parts' is not supported; supported: default"):
        LLM(str(folder), tokenizer=embedded_gguf)
