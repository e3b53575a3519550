"""GGUF files of Phi-3, SmolLM3, Gemma 2 and Gemma 3 written as llama.cpp's converter writes them,
from tiny random transformers models: the weights and fp32 logits match transformers' own GGUF
loader where it reads the architecture (phi3; gemma2 / gemma3, given the checkpoint's config), else
the checkpoint given the file's quantization round trip (smollm3: Q/K rows un-permuted, every fourth
layer without RoPE; Phi-3 longrope); greedy ids match; 4-bit layers stay 4-bit (Phi-3's fused QKV
and gate/up too); what cannot be served is refused before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import ModelConfig
from miaotui.errors import ModelLoadError, UnsupportedModelError
from miaotui.layers.quantized import Int4Linear, quantization_supported
from miaotui.loader import load_model, resolve_model
from tests.gguf_writer import add_tensor, finish, write_llama_gguf
from tests.gguf_writer_families import roundtrip, write_phi3_gguf
from tests.model_checks import hf_greedy_ids
from tests.models.test_gguf import assert_prompt_logits_match

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)
# Q4_K needs rows of 256 weights: a model 256 wide.
WIDE = dict(TINY, hidden_size=256, intermediate_size=256)
int4_only = pytest.mark.skipif(not quantization_supported("int4"), reason="this torch lacks the int4 CPU kernel")


def _quants(matrix: str):
    """Norms and RoPE tables in F32, the embedding and head in Q8_0 when quantized, matrices in `matrix`."""
    def quant_for(name: str) -> str:
        if "norm" in name or matrix in ("F32", "F16"):
            return "F32" if "norm" in name else matrix
        return "Q8_0" if name in ("token_embd.weight", "output.weight") else matrix
    return quant_for


def _ours(path, quantization: str = "none"):
    return load_model(resolve_model(str(path)), ModelConfig(model=str(path), quantization=quantization))


def _greedy(path, prompt: list[int], n: int, quantization: str = "none") -> list[int]:
    llm = LLM(str(path), skip_tokenizer_init=True, num_kv_blocks=64, block_size=4, max_model_len=128,
              quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids


def _hf(kind: str, folder, **overrides):
    from transformers import Phi3Config, Phi3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    config_cls, model_cls = {"phi3": (Phi3Config, Phi3ForCausalLM), "smollm3": (SmolLM3Config, SmolLM3ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model


# --- Phi-3 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("matrix", ["F32", "F16", "Q8_0", "Q4_0"])
def test_phi3_weights_logits_and_greedy_ids_match_transformers_gguf_loader(tmp_path, matrix):
    from transformers import AutoModelForCausalLM

    hf_model = _hf("phi3", tmp_path / "hf")
    path = write_phi3_gguf(tmp_path / "phi3.gguf", hf_model, _quants(matrix))
    model, cfg = _ours(path)
    assert cfg.architectures == ["Phi3ForCausalLM"] and cfg.head_dim == 16 and cfg.partial_rotary_factor is None
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    ours = dict(model.named_parameters())
    for name in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert torch.equal(ours[name], ref_sd[name]), name
    torch.manual_seed(0)
    assert_prompt_logits_match(model, path, ref, 19)
    prompt = list(range(30, 41))
    assert _greedy(path, prompt, 12) == hf_greedy_ids(ref, prompt, 12)


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [1.5 + 0.7 * i for i in range(6)]}


@pytest.mark.parametrize("original", [256, 16], ids=["short-factors", "long-factors"])
def test_phi3_longrope_partial_rotary_gguf_gives_the_checkpoints_logits(tmp_path, original):
    """Phi-4-mini's shape: 0.75 of each head rotates (rope.dimension_count 12 of head size 16) under
    longrope, whose factor lists the file stores as tensors. transformers' GGUF loader drops those
    lists, so the reference is the checkpoint itself, in F32."""
    hf_model = _hf("phi3", tmp_path / "hf", partial_rotary_factor=0.75, original_max_position_embeddings=original,
                   rope_parameters={**LONGROPE, "partial_rotary_factor": 0.75,
                                    "original_max_position_embeddings": original})
    path = write_phi3_gguf(tmp_path / "phi4mini.gguf", hf_model, _quants("F32"))
    model, cfg = _ours(path)
    assert cfg.head_dim == 16 and cfg.partial_rotary_factor == 0.75
    assert cfg.rope_scaling["long_factor"] == pytest.approx(LONGROPE["long_factor"])
    assert cfg.rope_scaling["short_factor"] == pytest.approx(LONGROPE["short_factor"])
    assert cfg.rope_scaling["original_max_position_embeddings"] == original
    assert model.model.layers[0].self_attn.rotary_dim == 12
    torch.manual_seed(0)
    assert_prompt_logits_match(model, path, hf_model, 21)  # 21 > 16: past the original length
    prompt = list(range(30, 47))
    assert _greedy(path, prompt, 10) == hf_greedy_ids(hf_model, prompt, 10)


@int4_only
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K"])
def test_phi3_fused_qkv_and_gate_up_stay_4bit_with_the_files_weights(tmp_path, kind):
    """attn_qkv / ffn_up in 4-bit blocks (one matrix each, shards stacked by rows; Q4_K as random
    blocks) load dequantized as transformers' GGUF loader reads them, with its logits; kept 4-bit,
    as the file's own codes, they give its greedy ids."""
    from transformers import AutoModelForCausalLM

    hf_model = _hf("phi3", tmp_path / "hf", hidden_size=WIDE["hidden_size"], intermediate_size=WIDE["intermediate_size"])
    path = write_phi3_gguf(tmp_path / "phi3.gguf", hf_model, _quants(kind))
    dense, _ = _ours(path)
    int4, _ = _ours(path, quantization="int4")
    attn, mlp = int4.model.layers[0].self_attn, int4.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, Int4Linear) and isinstance(mlp.gate_up_proj, Int4Linear)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
        assert torch.equal(dict(dense.named_parameters())[name], ref_sd[name]), name
    torch.manual_seed(0)
    assert_prompt_logits_match(dense, path, ref, 13)
    prompt = list(range(40, 53))
    assert _greedy(path, prompt, 6, "int4") == hf_greedy_ids(ref, prompt, 6)


def test_phi3_longrope_without_its_factor_tensors_is_refused(tmp_path):
    import gguf

    hf_model = _hf("phi3", tmp_path / "hf")
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "phi3")
    for key, value in (("block_count", 2), ("embedding_length", 64), ("attention.head_count", 4),
                       ("feed_forward_length", 128)):
        writer.add_uint32(f"phi3.{key}", value)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    for name, tensor in hf_model.state_dict().items():
        from tests.gguf_writer_families import PHI3_LAYER_MAP, _target

        add_tensor(writer, _target(name, PHI3_LAYER_MAP), tensor.float().numpy(), "F32")
    path = finish(writer, tmp_path / "bad.gguf")
    with pytest.raises(ModelLoadError, match=r"longrope but the file has no rope_factors_long"):
        _ours(path)


# --- SmolLM3 ---------------------------------------------------------------------------------------

def _smollm3_reference(hf_model, quant_for):
    """The checkpoint with each weight replaced by its round trip through the file's format."""
    import copy

    from tests.gguf_writer import gguf_name

    ref = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            stored = "output.weight" if name == "lm_head.weight" else gguf_name(name)
            param.copy_(torch.from_numpy(roundtrip(param.detach().numpy(), quant_for(stored))))
    return ref


@pytest.mark.parametrize("matrix", ["F32", "Q8_0", "Q4_0"])
def test_smollm3_gguf_matches_the_checkpoint_through_the_files_rounding(tmp_path, matrix):
    """llama.cpp writes SmolLM3 as a Llama (Q/K rows permuted) and runs every fourth layer without
    RoPE, as the checkpoint's no_rope_layers says: the un-permuted weights are the round-tripped
    checkpoint's exactly and so are the logits (transformers' GGUF loader does not read smollm3)."""
    hf_model = _hf("smollm3", tmp_path / "hf", num_hidden_layers=4, tie_word_embeddings=True)
    assert hf_model.config.no_rope_layers == [1, 1, 1, 0]
    quant_for = _quants(matrix)
    path = write_llama_gguf(tmp_path / "smollm3.gguf", hf_model, quant_for, arch="smollm3")
    model, cfg = _ours(path)
    assert cfg.architectures == ["SmolLM3ForCausalLM"] and cfg.no_rope_layers == [1, 1, 1, 0]
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [True, True, True, False]
    ref = _smollm3_reference(hf_model, quant_for)
    ref_sd = ref.state_dict()
    attn = model.model.layers[3].self_attn
    q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, ref_sd["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(k, ref_sd["model.layers.3.self_attn.k_proj.weight"])
    assert torch.equal(v, ref_sd["model.layers.3.self_attn.v_proj.weight"])
    torch.manual_seed(0)
    assert_prompt_logits_match(model, path, ref, 19)
    prompt = list(range(30, 41))
    assert _greedy(path, prompt, 12) == hf_greedy_ids(ref, prompt, 12)


@int4_only
def test_smollm3_q4_0_stays_4bit_with_rows_unpermuted(tmp_path):
    hf_model = _hf("smollm3", tmp_path / "hf", num_hidden_layers=4)
    quant_for = _quants("Q4_0")
    path = write_llama_gguf(tmp_path / "smollm3.gguf", hf_model, quant_for, arch="smollm3")
    int4, _ = _ours(path, quantization="int4")
    assert isinstance(int4.model.layers[0].self_attn.qkv_proj, Int4Linear)
    prompt = list(range(30, 41))
    assert _greedy(path, prompt, 8, "int4") == hf_greedy_ids(_smollm3_reference(hf_model, quant_for), prompt, 8)


# --- what cannot be served -------------------------------------------------------------------------

def _smollm3_file_with(tmp_path, monkeypatch, extra) -> object:
    """A SmolLM3 GGUF with `extra(writer)` called just before it is written out."""
    import tests.gguf_writer as writer_module

    hf_model = _hf("smollm3", tmp_path / "hf")
    real_finish = writer_module.finish

    def finish_with_extra(writer, out):
        extra(writer)
        return real_finish(writer, out)

    monkeypatch.setattr(writer_module, "finish", finish_with_extra)
    return write_llama_gguf(tmp_path / "smollm3.gguf", hf_model, _quants("F32"), arch="smollm3")


def test_tensor_the_architecture_has_no_place_for_is_named_before_loading(tmp_path, monkeypatch):
    path = _smollm3_file_with(tmp_path, monkeypatch,
                              lambda w: w.add_tensor("blk.0.attn_rot_embd.weight", np.zeros(8, np.float32)))
    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.attn_rot_embd\.weight' has no place in a 'smollm3'"):
        _ours(path)


def test_rope_scaling_the_engine_does_not_compute_is_refused_by_name(tmp_path, monkeypatch):
    import gguf

    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    path = _smollm3_file_with(tmp_path, monkeypatch, yarn)
    with pytest.raises(UnsupportedModelError, match=r"RoPE type 'yarn' is not supported"):
        _ours(path)


# --- Gemma 2 / Gemma 3 -----------------------------------------------------------------------------

def _gemma(kind: str, folder, **overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    # head_dim 16 (and its query scale), a window of 8 that 19-token prompts run past; Gemma 3 with
    # six layers has one global layer, whose RoPE is scaled linearly as on the 4B+ models.
    base = dict(TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True)
    if kind == "gemma2":
        config, cls = Gemma2Config(**{**base, **overrides}), Gemma2ForCausalLM
    else:
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        config = Gemma3TextConfig(**{**base, "num_hidden_layers": 6, "rope_parameters": rope, **overrides})
        cls = Gemma3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norm scales away from 0, so a missed (1 + w) shift shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("matrix", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_weights_logits_and_greedy_ids_match_transformers_gguf_loader(tmp_path, kind, matrix):
    """Norms come back as w from the file's 1 + w, Q/K rows as stored; the config carries the layer
    pattern, window, query scale, softcaps and per-layer-type RoPE. transformers' GGUF loader is given
    the checkpoint's config (its own reads neither the query scale nor Gemma 3's RoPE scaling)."""
    from transformers import AutoModelForCausalLM

    from tests.gguf_writer_families import write_gemma_gguf

    hf_model = _gemma(kind, tmp_path / "hf")
    path = write_gemma_gguf(tmp_path / f"{kind}.gguf", hf_model, _quants(matrix))
    model, cfg = _ours(path)
    hf_cfg = hf_model.config
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "head_dim", "final_logit_softcapping",
                "attn_logit_softcapping", "rope_parameters", "tie_word_embeddings", "num_hidden_layers"):
        assert getattr(cfg, key) == getattr(hf_cfg, key), key
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, config=hf_cfg,
                                               dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    ours = dict(model.named_parameters())
    attn = model.model.layers[1].self_attn
    q, k, _ = ours["model.layers.1.self_attn.qkv_proj.weight"].split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, ref_sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, ref_sd["model.layers.1.self_attn.k_proj.weight"])
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    names = [f"model.layers.0.{n}.weight" for n in norms] + ["model.norm.weight", "model.embed_tokens.weight"]
    if kind == "gemma3":
        names += ["model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"]
    for name in names:
        assert torch.equal(ours[name], ref_sd[name]), name
    if matrix == "F32":  # the file's 1 + w gives w back up to float rounding
        assert torch.allclose(ours["model.layers.0.input_layernorm.weight"],
                              hf_model.state_dict()["model.layers.0.input_layernorm.weight"], atol=1e-6)
    torch.manual_seed(0)
    assert_prompt_logits_match(model, path, ref, 19)
    prompt = list(range(30, 47))
    assert _greedy(path, prompt, 10) == hf_greedy_ids(ref, prompt, 10)


@int4_only
def test_gemma3_q4_0_stays_4bit_with_the_files_greedy_ids(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.gguf_writer_families import write_gemma_gguf

    hf_model = _gemma("gemma3", tmp_path / "hf")
    path = write_gemma_gguf(tmp_path / "gemma3.gguf", hf_model, _quants("Q4_0"))
    int4, _ = _ours(path, quantization="int4")
    assert isinstance(int4.model.layers[0].self_attn.qkv_proj, Int4Linear)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, config=hf_model.config,
                                               dtype=torch.float32).eval()
    prompt = list(range(30, 47))
    assert _greedy(path, prompt, 8, "int4") == hf_greedy_ids(ref, prompt, 8)


@pytest.mark.parametrize(("arch", "layers", "scalar"), [("gemma2", 46, 144), ("gemma2", 42, 256), ("gemma3", 62, 168),
                                                         ("gemma3", 34, 256)])
def test_gemma_query_scale_follows_llama_cpp(arch, layers, scalar):
    """The 27B models (46 / 62 layers) scale queries by hidden / heads, the others by the head size,
    as llama.cpp (and the checkpoints' query_pre_attn_scalar) do; the files do not say which."""
    from miaotui.loader.gguf_config import gemma_config

    hidden, heads = {("gemma2", 46): (4608, 32), ("gemma3", 62): (5376, 32)}.get((arch, layers), (2560, 8))
    meta_values = {"attention.key_length": 128 if scalar != 256 else 256, "attention.sliding_window": 1024}
    kwargs = dict(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)
    cfg = gemma_config(arch, kwargs, lambda key, default=None: meta_values.get(key, default), None)
    assert cfg.query_pre_attn_scalar == scalar


def test_end_of_turn_token_of_the_file_ends_generation(tmp_path, monkeypatch):
    """tokenizer.ggml.eot_token_id (Phi-3's <|end|>, Llama 3's <|eot_id|>) stops generation besides
    the EOS id, as llama.cpp does and a checkpoint's generation_config.json would say."""
    from miaotui.loader import eos_token_ids

    path = _smollm3_file_with(tmp_path, monkeypatch, lambda w: (w.add_eos_token_id(2), w.add_eot_token_id(7)))
    _, cfg = _ours(path)
    assert cfg.eos_token_id == [2, 7]
    assert eos_token_ids(resolve_model(str(path)), cfg, None) == frozenset({2, 7})
