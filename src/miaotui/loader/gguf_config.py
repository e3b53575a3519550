"""The config of a Llama-family GGUF (llama, qwen2, qwen3, phi3, smollm3), without transformers'
config classes.

Importing transformers' LlamaConfig / Qwen2Config pulls in its model-loading stack (torch.distributed
tensors, dynamo: ~2.5 s and ~160 MB on a 2-core machine), most of a cold start on a small GGUF,
while the file's metadata already says everything. This dataclass carries exactly the attributes
the Llama model, the rotary tables and the engine read, with transformers' meanings and defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.errors import ModelLoadError

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
# llama.cpp runs every fourth SmolLM3 layer without RoPE (its smollm3 graph hard-codes the step: the
# converter writes no key for it), as transformers' default no_rope_layer_interval = 4 does.
SMOLLM3_NO_ROPE_INTERVAL = 4


@dataclass(slots=True)
class LlamaFamilyConfig:
    model_type: str  # "llama" | "qwen2" (biased Q/K/V) | "qwen3" (Q/K norm) | "phi3" | "smollm3"
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
    eos_token_id: int | None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Phi-3's, where its file has one; the others run without
    partial_rotary_factor: float | None = None  # Phi-4-mini: only this share of a head rotates
    original_max_position_embeddings: int | None = None  # Phi-3 longrope's pre-extension length
    no_rope_layers: list[int] | None = None  # SmolLM3: per layer, 1 = applies RoPE
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
    return LlamaFamilyConfig(model_type=arch, rope_scaling=rope_scaling, **kwargs, **extra)
