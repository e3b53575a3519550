"""GGUF tensor names (llama.cpp's `blk.N.attn_q.weight` ...) -> Hugging Face checkpoint names, per
architecture, and which of the file's tensors are configuration rather than parameters.

The maps are the inverse of the gguf package's tensor_mapping.py for each MODEL_ARCH, restricted to
the tensors llama.cpp's converter writes for the model classes miaotui serves. A name a map lacks is
refused by `check_tensor_names` before anything loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from miaotui.errors import UnsupportedModelError

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Mixture-of-experts layers (Mixtral in `llama` files, `qwen3moe`): the router, and the experts
# stacked [E, N, K] in one tensor per projection. A stacked tensor's name is a marker
# (STACKED_EXPERTS) that the loader splits into per-expert checkpoint names (`expert_names`).
_MOE_LAYER_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}
STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def expert_names(stacked: str, count: int) -> list[str]:
    """The per-expert checkpoint names of a STACKED_EXPERTS marker, expert 0 first."""
    prefix, proj = STACKED_EXPERTS.match(stacked).groups()
    return [f"{prefix}.{e}.{proj}.weight" for e in range(count)]


# Phi-3: the checkpoint's pre-fused projections are stored as they are (attn_qkv = qkv_proj rows
# [q | k | v]; ffn_up = gate_up_proj rows [gate | up]), which is also the checkpoint's naming.
_PHI3_LAYER_NAMES = {
    **{k: v for k, v in _LAYER_NAMES.items() if not k.startswith(("ffn_gate", "ffn_up", "attn_q_norm", "attn_k_norm"))},
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
}
# Gemma 2 / 3: four norms per layer (llama.cpp's ffn_norm is the pre-feedforward one).
_GEMMA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # gemma3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# GPT-2 (names as in Hugging Face's GPT2LMHeadModel; llama.cpp also writes the tied head).
_GPT2_LAYER_NAMES = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
# BLOOM: llama.cpp regroups query_key_value into [q heads | k heads | v heads] rows.
_BLOOM_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
    "attn_qkv.weight": "self_attention.query_key_value.weight",
    "attn_qkv.bias": "self_attention.query_key_value.bias",
    "attn_output.weight": "self_attention.dense.weight", "attn_output.bias": "self_attention.dense.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_norm.bias": "post_attention_layernorm.bias",
    "ffn_up.weight": "mlp.dense_h_to_4h.weight", "ffn_up.bias": "mlp.dense_h_to_4h.bias",
    "ffn_down.weight": "mlp.dense_4h_to_h.weight", "ffn_down.bias": "mlp.dense_4h_to_h.bias",
}
_BLOOM_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.word_embeddings.weight",
    "token_embd_norm.weight": "transformer.word_embeddings_layernorm.weight",
    "token_embd_norm.bias": "transformer.word_embeddings_layernorm.bias",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_LLAMA_MAPS = (_GLOBAL_NAMES, _LAYER_NAMES, "model.layers")
_MOE_MAPS = (_GLOBAL_NAMES, {**_LAYER_NAMES, **_MOE_LAYER_NAMES}, "model.layers")
_NAME_MAPS = {
    "llama": _MOE_MAPS, "qwen2": _LLAMA_MAPS, "qwen3": _LLAMA_MAPS, "qwen3moe": _MOE_MAPS, "smollm3": _LLAMA_MAPS,
    "phi3": (_GLOBAL_NAMES, _PHI3_LAYER_NAMES, "model.layers"),
    "gemma2": (_GLOBAL_NAMES, _GEMMA_LAYER_NAMES, "model.layers"),
    "gemma3": (_GLOBAL_NAMES, _GEMMA_LAYER_NAMES, "model.layers"),
    "gpt2": (_GPT2_GLOBAL_NAMES, _GPT2_LAYER_NAMES, "transformer.h"),
    "bloom": (_BLOOM_GLOBAL_NAMES, _BLOOM_LAYER_NAMES, "transformer.h"),
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")

ROPE_FREQS = "rope_freqs.weight"  # llama3 per-dimension frequency divisors
# Phi-3 longrope: the checkpoint's rope_scaling long_factor / short_factor lists, stored as tensors.
ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"
CONFIG_TENSORS = frozenset({ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT})  # no parameter of the model
# Which of them each architecture reads (rope_freqs divides the single rotary table of the Llama family).
_READS = {"llama": {ROPE_FREQS}, "qwen2": {ROPE_FREQS}, "qwen3": {ROPE_FREQS}, "qwen3moe": {ROPE_FREQS},
          "smollm3": {ROPE_FREQS},
          "phi3": {ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT}}

# llama.cpp's converter permutes the rows of Q and K for its interleaved rotary layout only where
# the architecture runs llama.cpp's "normal" RoPE (LlamaModel and its subclasses with undo_permute);
# phi3, qwen2/3 and gemma run NeoX-style RoPE, whose layout is Hugging Face's, and are stored as is.
PERMUTED_QK = frozenset({"llama", "smollm3"})


def hf_tensor_name(name: str, arch: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name` in an `arch` file; None where there is none."""
    global_names, layer_names, layer_prefix = _NAME_MAPS[arch]
    if name in global_names:
        return global_names[name]
    match = _LAYER.match(name)
    if not match or match.group(2) not in layer_names:
        return None
    return f"{layer_prefix}.{match.group(1)}.{layer_names[match.group(2)]}"


def check_tensor_names(reader: Any, arch: str, path: Path) -> None:
    """Every tensor of the file is a parameter or a RoPE table miaotui reads (checked before any
    weight loads): a tensor nothing would read means a model variant this loader does not serve."""
    reads = _READS.get(arch, set())
    extra = [t.name for t in reader.tensors if t.name not in reads and hf_tensor_name(t.name, arch) is None]
    if extra:
        shown = ", ".join(repr(n) for n in extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        raise UnsupportedModelError(
            f"{path}: GGUF tensor {shown} has no place in a {arch!r} model as miaotui serves it (a variant of the "
            f"architecture it does not implement, or a file from a newer converter)")
