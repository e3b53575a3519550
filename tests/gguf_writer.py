"""Write tiny GGUF files from transformers Llama and GPT-2 models, as llama.cpp's converter would."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_MAP[rest]}"


def llama_family_writer(path: Path, cfg, arch: str):
    """A GGUFWriter for `path` holding the Llama family's metadata of transformers config `cfg`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "qwen3moe"):  # llama.cpp's converter writes the head size where it is the config's own
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(1)
    return writer


def write_llama_gguf(path: Path, hf_model, quant_for, arch: str = "llama",
                     tokenizer_from: str | None = None) -> Path:
    """Write `hf_model` (a transformers LlamaForCausalLM, or Qwen2/Qwen3/SmolLM3 with `arch` to match) to `path`.

    quant_for(gguf_tensor_name) -> a GGMLQuantizationType name ("F32", "Q8_0", ...).
    tokenizer_from: a GGUF file whose tokenizer.* metadata is copied over.
    """
    cfg = hf_model.config
    writer = llama_family_writer(path, cfg, arch)
    if tokenizer_from:
        copy_tokenizer(writer, tokenizer_from)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float().numpy()
        permuted = arch in ("llama", "smollm3")  # llama.cpp's LlamaModel and its subclasses
        if permuted and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        target = gguf_name(name)
        add_tensor(writer, target, w, quant_for(target))
    return finish(writer, path)


def copy_tokenizer(writer, tokenizer_from: str) -> None:
    """Copy the tokenizer.* metadata of another GGUF file."""
    import gguf

    reader = gguf.GGUFReader(tokenizer_from)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))


def add_tensor(writer, target: str, w: np.ndarray, quant: str) -> None:
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[quant]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(target, np.ascontiguousarray(w))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(target, np.ascontiguousarray(w.astype(np.float16)))
    else:
        writer.add_tensor(target, quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)


def finish(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GPT2_LAYER_MAP = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
GPT2_GLOBAL_MAP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                   "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def write_gpt2_gguf(path: Path, hf_model, quant_for, tokenizer_from: str | None = None) -> Path:
    """Write a transformers GPT2LMHeadModel as llama.cpp's converter does: Conv1D weights
    transposed to [out, in], and the tied head written out as output.weight."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(1)
    if tokenizer_from:
        copy_tokenizer(writer, tokenizer_from)
    for name, tensor in hf_model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        w = tensor.detach().float().numpy()
        if name == "lm_head.weight":
            target = "output.weight"
        elif name in GPT2_GLOBAL_MAP:
            target = GPT2_GLOBAL_MAP[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            target = f"blk.{layer}.{GPT2_LAYER_MAP[module]}.{kind}"
            if kind == "weight" and w.ndim == 2:
                w = w.T
        add_tensor(writer, target, w, quant_for(target))
    return finish(writer, path)


BLOOM_LAYER_MAP = {
    "input_layernorm": "attn_norm", "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}
BLOOM_GLOBAL_MAP = {
    "transformer.word_embeddings.weight": "token_embd.weight",
    "transformer.word_embeddings_layernorm.weight": "token_embd_norm.weight",
    "transformer.word_embeddings_layernorm.bias": "token_embd_norm.bias",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}


def write_bloom_gguf(path: Path, hf_model, quant_for) -> Path:
    """Write a transformers BloomForCausalLM as llama.cpp's converter does: query_key_value
    regrouped from per-head [q|k|v] to [q heads | k heads | v heads], the tied head written out."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(1)
    state = hf_model.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    for name, tensor in state.items():
        w = tensor.detach().float().numpy()
        if name in BLOOM_GLOBAL_MAP:
            target = BLOOM_GLOBAL_MAP[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            target = f"blk.{layer}.{BLOOM_LAYER_MAP[module]}.{kind}"
            if module.endswith("query_key_value"):
                heads = cfg.n_head
                w = w.reshape(heads, 3, w.shape[0] // 3 // heads, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        add_tensor(writer, target, w, quant_for(target))
    return finish(writer, path)
