"""GGUF files (llama.cpp's format) via the `gguf` package: config, tensor names, dequantization.

Weights are dequantized to the compute dtype at load. llama.cpp's converter permutes the rows
of Q and K for its rotary layout ("llama" architecture only); we undo that so one model
implementation serves both sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miaotui.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"  # llama3 per-dimension frequency divisors


def open_gguf(path: Path) -> Any:
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad data
        raise ModelLoadError(f"{path} is truncated or corrupt: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_architecture(reader: Any, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def check_quant_types(reader: Any, path: Path) -> None:
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {tensor.name!r} uses GGUF quantization type {name}, which is not "
                f"supported; supported: {', '.join(SUPPORTED_QUANT_TYPES)}"
            )


def gguf_hf_config(reader: Any, path: Path) -> Any:
    """Build the transformers config the GGUF metadata describes."""
    from transformers import LlamaConfig, Qwen2Config

    arch = gguf_architecture(reader, path)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    if heads is None or hidden is None or meta("block_count") is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.block_count/embedding_length/head_count")
    head_dim = meta("rope.dimension_count") or meta("attention.key_length") or hidden // heads
    names = {t.name for t in reader.tensors}
    kwargs: dict[str, Any] = dict(
        vocab_size=meta("vocab_size") or (len(tokens) if tokens else None),
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta("context_length", 2048),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        architectures=[SUPPORTED_ARCHITECTURES[arch]],
    )
    if meta("rope.scaling.type") == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    if arch == "qwen2":
        return Qwen2Config(**kwargs)
    return LlamaConfig(**kwargs)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (pairs interleaved -> halves split)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    data = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors come back as read-only views of the mmap
        data = data.copy()
    return data.reshape(shape)


def iter_gguf_tensors(reader: Any, hf_config: Any, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield Hugging Face-named fp32 tensors; the caller converts to the compute dtype."""
    permute = _field(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        name = tensor.name
        if name == ROPE_FREQS:
            continue
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            match = _LAYER.match(name)
            if not match or match.group(2) not in _LAYER_NAMES:
                raise ModelLoadError(f"{path}: unknown GGUF tensor {name!r}")
            hf_name = f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
        try:
            array = dequantize(tensor)
        except (ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} is truncated or corrupt: {exc}") from exc
        if permute and ".q_proj." in hf_name:
            array = _unpermute(array, hf_config.num_attention_heads)
        elif permute and ".k_proj." in hf_name:
            array = _unpermute(array, hf_config.num_key_value_heads)
        yield hf_name, torch.from_numpy(array)


def rope_freq_factors(reader: Any) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            return torch.from_numpy(dequantize(tensor).reshape(-1).copy())
    return None
