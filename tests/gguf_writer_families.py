"""Write tiny GGUF files of Phi-3 and Gemma 2 / 3 as llama.cpp's convert_hf_to_gguf does, and the
quantization round trip that a reference model is given to match a quantized file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tests.gguf_writer import add_tensor, finish

PHI3_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


GEMMA_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _target(name: str, layer_map: dict[str, str]) -> str:
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{layer_map[rest]}"


def write_phi3_gguf(path: Path, hf_model, quant_for) -> Path:
    """A transformers Phi3ForCausalLM as llama.cpp writes it: qkv_proj / gate_up_proj kept fused
    (attn_qkv, ffn_up), rope.dimension_count the rotary width, longrope's factor lists as the
    rope_factors_long / rope_factors_short tensors with the original length and attention factor
    in the metadata. quant_for(gguf_tensor_name) -> a GGMLQuantizationType name ("Q4_K": random
    blocks, see `add_any`)."""
    import gguf

    cfg = hf_model.config
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0
    rope_dims = int(partial * cfg.hidden_size) // cfg.num_attention_heads
    original = params.get("original_max_position_embeddings", cfg.original_max_position_embeddings)
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    writer.add_file_type(1)
    writer.add_sliding_window(cfg.sliding_window or 0)
    writer.add_vocab_size(cfg.vocab_size)
    _add_special_ids(writer, cfg)
    if params.get("rope_type") == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        scale = cfg.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        writer.add_tensor("rope_factors_long.weight", np.asarray(params["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(params["short_factor"], np.float32))
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target = _target(name, PHI3_LAYER_MAP)
        add_any(writer, target, tensor.detach().float().numpy(), quant_for(target))
    return finish(writer, path)


def write_gemma_gguf(path: Path, hf_model, quant_for) -> Path:
    """A transformers Gemma2ForCausalLM / Gemma3ForCausalLM as llama.cpp writes it: every norm scale
    stored as 1 + w, Q/K rows as they are, the tied head left out; Gemma 3's global-layer linear
    RoPE scaling as rope.scaling.*."""
    import gguf

    cfg = hf_model.config
    arch = "gemma3" if cfg.model_type.startswith("gemma3") else "gemma2"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(1)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_vocab_size(cfg.vocab_size)
    _add_special_ids(writer, cfg)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = cfg.rope_parameters["full_attention"]
        writer.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        if cfg.final_logit_softcapping:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float().numpy()
        if name.endswith("norm.weight"):
            w = w + 1.0
        target = _target(name, GEMMA_LAYER_MAP)
        add_any(writer, target, w, quant_for(target))
    return finish(writer, path)


def _add_special_ids(writer, cfg) -> None:
    """tokenizer.ggml.*_token_id, which transformers' GGUF loader reads into its config (its class
    defaults, e.g. Phi-3's pad id 32000, lie outside a tiny vocabulary)."""
    for kind in ("bos", "eos", "pad"):
        if isinstance(getattr(cfg, f"{kind}_token_id", None), int):
            getattr(writer, f"add_{kind}_token_id")(getattr(cfg, f"{kind}_token_id"))


def random_q4_k(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_K super-blocks of a [..., n, k] matrix (stacked experts have a leading dim; the gguf
    package cannot quantize to Q4_K): random codes and 6-bit scales, d and dmin small enough for
    weights of a random model's size."""
    rng = np.random.default_rng(sum(name.encode()))
    *lead, k = shape
    n = int(np.prod(lead))
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.full((n, k // 256, 1), 0.0002, np.float16).view(np.uint8)
    raw[..., 2:4] = np.full((n, k // 256, 1), 0.0001, np.float16).view(np.uint8)
    return raw.reshape(*lead, -1)


def add_any(writer, target: str, w: np.ndarray, quant: str) -> None:
    """add_tensor, with "Q4_K" written as `random_q4_k` blocks of w's shape (not w's values)."""
    import gguf

    if quant == "Q4_K":
        writer.add_tensor(target, random_q4_k(target, w.shape), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    else:
        add_tensor(writer, target, w, quant)


def roundtrip(w: np.ndarray, quant: str) -> np.ndarray:
    """`w` as a file stored in `quant` gives it back (rows permuted or not: blocks run along a row)."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[quant]
    if qtype == gguf.GGMLQuantizationType.F32:
        return w
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16).astype(np.float32)
    return quants.dequantize(quants.quantize(np.ascontiguousarray(w), qtype), qtype).reshape(w.shape)
