"""The config of a Llama-family GGUF (llama, qwen2, qwen3, phi3, smollm3), without transformers'
config classes.

Importing transformers' LlamaConfig / Qwen2Config pulls in its model-loading stack (torch.distributed
tensors, dynamo: ~2.5 s and ~160 MB on a 2-core machine), most of a cold start on a small GGUF,
while the file's metadata already says everything. This dataclass carries exactly the attributes
the Llama model, the rotary tables and the engine read, with transformers' meanings and defaults.
Gemma 2 / 3 files get transformers' own Gemma2Config / Gemma3TextConfig (`gemma_config`), with
what llama.cpp fixes in code rather than in the file (layer pattern, local RoPE base, Q scaling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.errors import ModelLoadError, UnsupportedModelError

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}
# llama.cpp runs every fourth SmolLM3 layer without RoPE (its smollm3 graph hard-codes the step: the
# converter writes no key for it), as transformers' default no_rope_layer_interval = 4 does.
SMOLLM3_NO_ROPE_INTERVAL = 4


@dataclass(slots=True)
class LlamaFamilyConfig:
    model_type: str  # "llama" | "qwen2" (biased Q/K/V) | "qwen3" (Q/K norm) | "phi3" | "smollm3" | "mixtral" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None  # a list: the file's end-of-turn / end-of-message ids too
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Phi-3's, where its file has one; the others run without
    partial_rotary_factor: float | None = None  # Phi-4-mini: only this share of a head rotates
    original_max_position_embeddings: int | None = None  # Phi-3 longrope's pre-extension length
    no_rope_layers: list[int] | None = None  # SmolLM3: per layer, 1 = applies RoPE
    # Mixture-of-experts (transformers' names: Mixtral's num_local_experts, Qwen3-MoE's num_experts).
    num_local_experts: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.architectures:
            self.architectures = [_ARCHITECTURES[self.model_type]]


def _rope_scaling(meta: Callable[..., Any]) -> dict[str, Any] | None:
    """rope.scaling.* as transformers' rope_scaling. Types other than linear are handed on by name
    for the model's check_config to refuse: served without them the model would be wrong past the
    original context, silently."""
    kind = meta("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": meta("rope.scaling.factor")}
    if meta("rope.scaling.original_context_length") is not None:
        scaling["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
    return scaling


def llama_family_config(arch: str, kwargs: dict[str, Any], meta: Callable[..., Any],
                        rope_factors: dict[str, list[float]], path: Path) -> LlamaFamilyConfig:
    """The config of a llama / qwen2 / qwen3 / phi3 / smollm3 file from the shared sizes in `kwargs`,
    the `arch.`-prefixed metadata (`meta(key, default)`) and Phi-3's longrope factor tensors
    (`rope_factors`: long_factor / short_factor lists, empty where the file has none)."""
    extra: dict[str, Any] = {}
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None and rope_scaling["rope_type"] == "yarn":
        # Checkpoints' YaRN runs (layers/rotary.py), but a file's is llama.cpp's, whose parameters
        # (rope.scaling.yarn_*, attn_factor) are not read yet: refused rather than run with
        # transformers' defaults, which may not be the file's.
        raise UnsupportedModelError(f"{path}: RoPE type 'yarn' is not supported in GGUF files yet (its llama.cpp "
                                    "parameters are not read); a Hugging Face folder of the model runs it")
    if arch == "phi3":
        # rope.dimension_count is the rotary width (partial_rotary_factor * head size), not the head size.
        head_dim = meta("attention.key_length") or kwargs["hidden_size"] // kwargs["num_attention_heads"]
        rotary = meta("rope.dimension_count") or head_dim
        kwargs = {**kwargs, "head_dim": head_dim}
        if rotary != head_dim:
            extra["partial_rotary_factor"] = rotary / head_dim
        extra["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
        extra["sliding_window"] = meta("attention.sliding_window") or None  # 0: none (Phi-4)
        if rope_scaling is not None and rope_scaling["rope_type"] == "longrope" and not rope_factors:
            raise ModelLoadError(f"{path}: phi3.rope.scaling.type is longrope but the file has no rope_factors_long"
                                 ".weight / rope_factors_short.weight tensors (re-convert the model)")
        if rope_factors:
            if len(rope_factors) != 2:
                raise ModelLoadError(f"{path}: a phi3 GGUF with longrope needs both rope_factors_long.weight and "
                                     f"rope_factors_short.weight; it has only {', '.join(rope_factors)}")
            if extra["original_max_position_embeddings"] is None:
                raise ModelLoadError(f"{path}: a phi3 GGUF with longrope factors needs "
                                     "phi3.rope.scaling.original_context_length in its metadata")
            rope_scaling = {"rope_type": "longrope", **rope_factors,
                            "original_max_position_embeddings": extra["original_max_position_embeddings"]}
            if meta("rope.scaling.attn_factor") is not None:  # the converter's sqrt(1 + ln s / ln L)
                rope_scaling["attention_factor"] = float(meta("rope.scaling.attn_factor"))
    elif arch == "smollm3":
        extra["no_rope_layers"] = [int((i + 1) % SMOLLM3_NO_ROPE_INTERVAL != 0)
                                   for i in range(kwargs["num_hidden_layers"])]
    model_type = arch
    experts, used = meta("expert_count"), meta("expert_used_count")
    if arch == "qwen3moe" or (arch == "llama" and experts):
        if not experts or not used:
            raise ModelLoadError(f"{path}: a mixture-of-experts GGUF needs {arch}.expert_count and "
                                 f"{arch}.expert_used_count in its metadata")
        extra["num_experts_per_tok"] = used
        if arch == "llama":  # Mixtral: feed_forward_length is each expert's size
            model_type, extra["num_local_experts"] = "mixtral", experts
        else:  # every layer MoE, renormalised top-k, as llama.cpp's qwen3moe graph runs it
            model_type, extra["num_experts"] = "qwen3_moe", experts
            extra["moe_intermediate_size"] = meta("expert_feed_forward_length") or kwargs["intermediate_size"]
            extra["norm_topk_prob"] = bool(meta("expert_weights_norm", True))
    return LlamaFamilyConfig(model_type=model_type, rope_scaling=rope_scaling, **kwargs, **extra)


# Layers per sliding-window period (the last of each period is global), fixed in llama.cpp's code
# for these architectures as in transformers' configs: Gemma 2 alternates, Gemma 3 has five local
# layers per global one.
_GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
# The 27B models scale queries by 1/sqrt(hidden / heads) instead of 1/sqrt(head size) (transformers'
# query_pre_attn_scalar 144 / 168); llama.cpp tells them by their layer count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_config(arch: str, kwargs: dict[str, Any], meta: Callable[..., Any], path: Path) -> Any:
    """transformers' Gemma2Config / Gemma3TextConfig of a gemma2 / gemma3 file, from the shared
    sizes in `kwargs` and the `arch.`-prefixed metadata (`meta(key, default)`)."""
    from transformers import Gemma2Config, Gemma3TextConfig

    hidden, heads, layers = kwargs["hidden_size"], kwargs["num_attention_heads"], kwargs["num_hidden_layers"]
    head_dim = meta("attention.key_length") or hidden // heads
    if meta("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: {arch}.attention.value_length {meta('attention.value_length')} differs "
                                    f"from key_length {head_dim}; miaotui's Gemma has one head size")
    if meta("attention.scale") is not None:  # a file that states its query scale 1/sqrt(s)
        query_scalar = 1.0 / float(meta("attention.scale")) ** 2
    else:
        query_scalar = hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
    period = _GEMMA_SWA_PERIOD[arch]
    layer_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    common = dict(
        vocab_size=kwargs["vocab_size"], hidden_size=hidden, intermediate_size=kwargs["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kwargs["num_key_value_heads"],
        head_dim=head_dim, max_position_embeddings=kwargs["max_position_embeddings"],
        rms_norm_eps=kwargs["rms_norm_eps"], query_pre_attn_scalar=query_scalar, layer_types=layer_types,
        tie_word_embeddings=kwargs["tie_word_embeddings"], bos_token_id=kwargs["bos_token_id"],
        eos_token_id=kwargs["eos_token_id"],
        final_logit_softcapping=meta("final_logit_softcapping"),
    )
    scaling = _rope_scaling(meta)
    if arch == "gemma2":
        if scaling is not None:
            raise UnsupportedModelError(f"{path}: gemma2 with rope.scaling.type {scaling['rope_type']!r} is not served")
        return Gemma2Config(
            **{**common, "final_logit_softcapping": meta("final_logit_softcapping", 30.0)},
            attn_logit_softcapping=meta("attn_logit_softcapping", 50.0),
            sliding_window=meta("attention.sliding_window", 4096),
            rope_parameters={"rope_type": "default", "rope_theta": float(kwargs["rope_theta"])},
            architectures=["Gemma2ForCausalLM"])
    if meta("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{path}: gemma3.attn_logit_softcapping is set; Gemma 3 has none")
    # rope.scaling (linear, factor 8 on the 4B+ models) applies to the global layers only; the local
    # ones keep base 10000 (rope.freq_base_swa where a newer converter writes it) unscaled.
    full = {"rope_type": "default", "rope_theta": float(kwargs["rope_theta"])}
    if scaling is not None:
        full.update({k: v for k, v in scaling.items() if v is not None})
    local = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base_swa", 10000.0))}
    if meta("attention.sliding_window") is None:
        raise ModelLoadError(f"{path}: gemma3 GGUF metadata lacks gemma3.attention.sliding_window")
    return Gemma3TextConfig(**common, sliding_window=meta("attention.sliding_window"),
                            rope_parameters={"full_attention": full, "sliding_attention": local},
                            architectures=["Gemma3ForCausalLM"])
