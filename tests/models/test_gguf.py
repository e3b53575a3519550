"""GGUF loading: tiny files written with the gguf package's writer, checked against the same
file loaded by transformers (an independent dequantizer and Q/K un-permuter)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from miaotui.errors import ModelLoadError, UnsupportedModelError
from miaotui.loader import load_model, resolve_model
from miaotui.request import Request
from miaotui.runner.model_runner import ModelRunner
from miaotui.sampling_params import SamplingParams
from tests.conftest import make_tiny_checkpoint
from tests.gguf_writer import write_llama_gguf


def mixed_quants(name: str) -> str:
    if "norm" in name:
        return "F32"
    if name == "token_embd.weight":
        return "Q8_0"
    if name == "output.weight":
        return "F16"
    if ".attn_" in name:
        return "Q4_0"
    return "Q4_1"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    _, hf_model = make_tiny_checkpoint(folder / "hf", "llama", tie_word_embeddings=False)
    path = write_llama_gguf(folder / "tiny.gguf", hf_model, mixed_quants)
    return path, hf_model


def _ours(path):
    return load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization="none"))


def assert_prompt_logits_match(model, path, reference, num_tokens: int) -> None:
    """Our next-token logits after a random prompt (one prefill step through the paged runner)
    are within 1e-4 of `reference`'s (a transformers model)."""
    ids = torch.randint(0, 256, (num_tokens,)).tolist()
    runner = ModelRunner(model, ModelConfig(model=str(path)), CacheConfig(block_size=8, num_blocks=64), 512)
    kv = KVCacheManager(64, 8, windows=runner.kv_windows)  # sliding-window layers' own KV groups
    req = Request("g", ids, SamplingParams(temperature=0), frozenset(), 512, "g")
    assert kv.allocate_slots(req, len(ids))
    ours = runner.forward_logits(SchedulerOutput([ScheduledSeq(req, 0, len(ids))]))[0]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    assert (ours - expected).abs().max().item() <= 1e-4


def test_dequantized_weights_match_transformers_gguf_loader(tiny_gguf):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    model, _ = _ours(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    attn = model.model.layers[1].self_attn
    qkv = attn.qkv_proj.weight
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, ref_sd["model.layers.1.self_attn.q_proj.weight"])  # Q4_0 + un-permute
    assert torch.equal(k, ref_sd["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, ref_sd["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, ref_sd["model.layers.0.mlp.gate_proj.weight"])  # Q4_1
    assert torch.equal(up, ref_sd["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.model.embed_tokens.weight, ref_sd["model.embed_tokens.weight"])  # Q8_0
    assert torch.equal(model.lm_head.weight, ref_sd["lm_head.weight"])  # F16


def test_dequantization_error_is_within_the_quant_step(tiny_gguf):
    """Loaded weights are the original ones up to each format's rounding, so the un-permutation
    put every row back in place (a wrong permutation gives errors of the weights' own size)."""
    path, hf_model = tiny_gguf
    model, _ = _ours(path)
    orig = hf_model.state_dict()
    attn = model.model.layers[0].self_attn
    q = attn.qkv_proj.weight[: attn.q_size]
    q_err = (q - orig["model.layers.0.self_attn.q_proj.weight"]).abs().max().item()
    embed_err = (model.model.embed_tokens.weight - orig["model.embed_tokens.weight"]).abs().max().item()
    scale = orig["model.layers.0.self_attn.q_proj.weight"].abs().max().item()
    assert q_err < scale / 7 / 2 + 1e-6  # 4-bit: half a step of a 16-level grid over [-max, max]
    assert embed_err < orig["model.embed_tokens.weight"].abs().max().item() / 127  # 8-bit


def test_logits_match_transformers_on_the_same_gguf(tiny_gguf):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    model, _ = _ours(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    torch.manual_seed(0)
    assert_prompt_logits_match(model, path, ref, 19)


def test_unsupported_quant_type_is_named(tmp_path):
    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama", intermediate_size=256)  # TQ2_0 rows of 256
    path = write_llama_gguf(tmp_path / "tq2.gguf", hf_model,
                            lambda n: "TQ2_0" if n == "blk.0.ffn_down.weight" else "F32")
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_down\.weight.*TQ2_0"):
        _ours(path)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_q5_0_and_q5_1_layers_match_transformers_gguf_loader(tmp_path, quantization):
    """llama.cpp's Q4_K_M falls back to Q5_0 (and Q5_1 / Q4_1 in other mixes) for rows that are
    not a multiple of 256 (Gemma-3-270M's 640): such layers load, dequantized (int8 under int4,
    as every matrix stored above 4 bits), and give transformers' logits on the same file."""
    from transformers import AutoModelForCausalLM

    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama", tie_word_embeddings=False)
    path = write_llama_gguf(tmp_path / "q5.gguf", hf_model, lambda n: "F32" if "norm" in n else
                            "Q5_0" if ".attn_" in n else "Q5_1" if ".ffn_" in n else "F16")
    model, _ = load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization=quantization))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if quantization == "none":
        q, _, _ = model.model.layers[0].self_attn.qkv_proj.weight.split([64, 32, 32])
        assert torch.equal(q, ref.state_dict()["model.layers.0.self_attn.q_proj.weight"])
        torch.manual_seed(0)
        assert_prompt_logits_match(model, path, ref, 19)
    else:
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"


def test_unsupported_gguf_architecture_lists_supported(tmp_path):
    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "llama")
    path = write_llama_gguf(tmp_path / "falcon.gguf", hf_model, lambda n: "F32", arch="falcon")
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*supported: llama, qwen2"):
        _ours(path)


def test_truncated_gguf_is_reported(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    shutil.copy(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        _ours(cut)


def test_file_that_is_not_gguf_is_reported(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        _ours(bogus)


def test_gpt2_gguf_loads_like_transformers(tmp_path, embedded_gguf):
    """llama.cpp's "gpt2" layout (Conv1D weights transposed, tied head written out) loads into
    the same weights transformers' own GGUF loader produces, and gives its logits."""
    from transformers import AutoModelForCausalLM

    from tests.gguf_writer import write_gpt2_gguf

    # transformers' GGUF loader takes the vocabulary from the tokenizer and ignores
    # gpt2.context_length, so the tiny model uses a real tokenizer and GPT-2's 1024 positions.
    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "gpt2", vocab_size=49152, n_positions=1024)
    path = write_gpt2_gguf(tmp_path / "gpt2.gguf", hf_model,
                           lambda name: "Q8_0" if name.endswith(".weight") and "norm" not in name else "F32",
                           tokenizer_from=embedded_gguf)
    model, cfg = _ours(path)
    assert cfg.architectures == ["GPT2LMHeadModel"] and cfg.n_layer == 2
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    ours = dict(model.named_parameters())
    assert torch.equal(ours["transformer.h.1.attn.c_attn.weight"], ref_sd["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(ours["transformer.wpe.weight"], ref_sd["transformer.wpe.weight"])
    assert_prompt_logits_match(model, path, ref, 11)


def test_bloom_gguf_gives_the_checkpoints_logits(tmp_path):
    """llama.cpp's "bloom" layout (query_key_value regrouped by q/k/v, the tied head written out),
    in F32, reproduces the transformers model's logits."""
    from tests.gguf_writer import write_bloom_gguf

    _, hf_model = make_tiny_checkpoint(tmp_path / "hf", "bloom", n_head=6, hidden_size=96)
    path = write_bloom_gguf(tmp_path / "bloom.gguf", hf_model, lambda name: "F32")
    model, cfg = _ours(path)
    assert cfg.architectures == ["BloomForCausalLM"] and cfg.n_head == 6
    assert_prompt_logits_match(model, path, hf_model, 13)


def test_second_load_reads_the_cached_index_with_the_same_weights(tiny_gguf, tmp_path, monkeypatch):
    """After the first read, the metadata and tensor table come from a cached index (no full
    GGUFReader parse); the weights and config are identical, and a changed file is read anew."""
    import os

    from miaotui.loader.gguf import open_gguf
    from miaotui.loader.gguf_index import GGUFIndex

    monkeypatch.setenv("MIAOTUI_CACHE_DIR", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    assert not isinstance(open_gguf(path), GGUFIndex)  # first read: the gguf package's reader
    assert isinstance(open_gguf(path), GGUFIndex)
    (m1, c1), (m2, c2) = _ours(path), _ours(path)
    assert c1 == c2
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # "changed": key differs
    assert not isinstance(open_gguf(path), GGUFIndex)
