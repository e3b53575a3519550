"""`--load-format dummy`: random weights for a real model configuration, to measure speed with no
checkpoint on the machine.
Built-in names: SmolLM2, Llama 3.x, Qwen2.5, Qwen3, Gemma 2/3 and SmolLM3 shapes.

The configuration comes from a built-in name (the real configs of the models we benchmark), a
config.json file, or a folder holding one. Weights are drawn N(0, 0.02) (norm weights 1) from a
fixed seed, directly on the target device; the tokenizer is the one given, else the embedded
model's (token ids beyond its vocabulary decode to nothing, which is fine for benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from miaotui.errors import ModelLoadError
from miaotui.layers.norms import OffsetRMSNorm
from miaotui.loader.safetensors import language_model_config

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
                         eos_token_id=151645),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    # Gemma 3: five local layers (window 512) per global one; RoPE bases 10k local, 1M global (the defaults).
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512,
                         query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512,
                       query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=4096,
                       query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    "smollm3-3b": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=5000000.0,
                       no_rope_layer_interval=4, tie_word_embeddings=True, bos_token_id=128000,
                       eos_token_id=128012),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "smollm3": "SmolLM3ForCausalLM"}


def dummy_hf_config(ref: str | None) -> Any:
    """A transformers config from a built-in name, a config.json, or a folder with one."""
    from transformers import AutoConfig

    if ref is None:
        raise ModelLoadError(f"--load-format dummy needs --model: a built-in name ({', '.join(BUILTIN_CONFIGS)}), "
                             f"a config.json, or a folder holding one")
    if ref in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[ref])
        model_type = values.pop("model_type")
        config = AutoConfig.for_model(model_type, **values)
        config.architectures = [_ARCHITECTURES[model_type]]
        return config
    path = Path(ref).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"--load-format dummy: {ref} is neither a built-in config "
                             f"({', '.join(BUILTIN_CONFIGS)}) nor a config.json or a folder with one")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read: {exc}") from exc
    return language_model_config(config)


@torch.no_grad()
def fill_random(model: nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
    """Give every parameter still on the meta device real storage: N(0, 0.02), norms 1 (Gemma's
    (1 + w) norms 0, the same factor of 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        data = torch.empty(param.shape, dtype=dtype, device=device)
        leaf = module_name.rsplit(".", 1)[-1]
        if "norm" in leaf or leaf.startswith("ln"):
            data.fill_(1.0 if attr == "weight" and not isinstance(module, OffsetRMSNorm) else 0.0)
        else:
            data.normal_(0.0, 0.02, generator=g)
        setattr(module, attr, nn.Parameter(data, requires_grad=False))
