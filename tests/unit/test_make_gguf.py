"""benchmarks/make_gguf.py's writer: a tiny random Qwen3 file that miaotui loads and runs, and a
tiny Gemma 3 file in llama.cpp's converter layout (names, norm +1, sliding-window metadata) that
miaotui reads back as the config it was written from.
llama.cpp's quantizer is not on this path: F16 files only."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import make_gguf  # noqa: E402


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return ({k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")},
            {t.name: t for t in reader.tensors})


def _written(shape: str, tmp_path: Path):
    """(the shape's config, its F16 file, the file's metadata, its tensors by name)."""
    path = make_gguf.write_f16(shape, tmp_path / f"{shape}.gguf", progress=False)
    return (make_gguf.hf_config(shape), path, *_fields(path))


def _generates_4_tokens(llm, prompt: list[int]) -> list[int]:
    from miaotui import SamplingParams

    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    assert len(ids) == 4
    return ids


@pytest.mark.embedded
def test_tiny_qwen3_file_loads_in_miaotui_and_generates(tmp_path):
    from miaotui import LLM

    config, path, meta, tensors = _written("tiny-qwen3", tmp_path)
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.attention.key_length"] == config.head_dim  # Q is heads x head_dim, not hidden
    assert "output.weight" not in tensors  # tied, as the converter writes it
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.1.attn_k_norm.weight"].tensor_type.name == "F32"
    assert len(tensors) == 2 + 11 * config.num_hidden_layers  # embedding, final norm; 11 a layer (q/k norms)

    llm = LLM(str(path), max_num_seqs=2, num_kv_blocks=16, max_model_len=64)
    read = llm.engine.hf_config  # what miaotui reads from the metadata is the shape written
    assert (read.model_type, read.hidden_size, read.num_attention_heads, read.num_key_value_heads, read.head_dim,
            read.intermediate_size, read.vocab_size, read.tie_word_embeddings) == (
        "qwen3", config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        config.intermediate_size, config.vocab_size, True)
    assert all(0 <= i < config.vocab_size for i in _generates_4_tokens(llm, [5, 6, 7, 8]))


def test_tiny_gemma3_file_has_the_converter_layout_and_loads_in_miaotui(tmp_path):
    from miaotui import LLM

    config, path, meta, tensors = _written("tiny-gemma3", tmp_path)
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
    assert meta["gemma3.attention.sliding_window"] == config.sliding_window
    assert meta["gemma3.attention.key_length"] == config.head_dim
    for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"):
        # HF's Gemma norms are 0 at init (the model multiplies by 1 + w); the file holds 1 + w.
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.0.{norm}.weight"].data), 1.0)
    assert "output.weight" not in tensors
    assert int(tensors["token_embd.weight"].shape[-1]) == config.vocab_size
    reader = gguf.GGUFReader(str(path))
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == config.vocab_size
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"

    llm = LLM(str(path), max_num_seqs=2, num_kv_blocks=32, max_model_len=64)
    read = llm.engine.hf_config
    assert (read.layer_types, read.sliding_window, read.query_pre_attn_scalar, read.head_dim) == (
        config.layer_types, config.sliding_window, config.query_pre_attn_scalar, config.head_dim)
    assert read.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert read.rope_parameters["full_attention"]["rope_theta"] == 1e6
    _generates_4_tokens(llm, [300, 301, 302, 303])


@pytest.mark.embedded
def test_tiny_qwen3moe_file_stacks_experts_and_loads_in_miaotui(tmp_path):
    from miaotui import LLM

    config, path, meta, tensors = _written("tiny-qwen3moe", tmp_path)
    assert meta["general.architecture"] == "qwen3moe"
    assert (meta["qwen3moe.expert_count"], meta["qwen3moe.expert_used_count"]) == (8, 2)
    # GGUF lists dims innermost first: [hidden, expert size, experts] for gate / up.
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [config.hidden_size, config.moe_intermediate_size, 8]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [config.moe_intermediate_size, config.hidden_size, 8]
    assert list(tensors["blk.0.ffn_gate_inp.weight"].shape) == [config.hidden_size, 8]
    llm = LLM(str(path), max_num_seqs=2, num_kv_blocks=16, max_model_len=64)
    read = llm.engine.hf_config
    assert (read.model_type, read.num_experts, read.num_experts_per_tok, read.moe_intermediate_size,
            read.norm_topk_prob) == ("qwen3_moe", 8, 2, config.moe_intermediate_size, True)
    _generates_4_tokens(llm, [5, 6, 7, 8])
