"""The config of a Llama-family GGUF (llama, qwen2, qwen3), without transformers' config classes.

Importing transformers' LlamaConfig / Qwen2Config pulls in its model-loading stack (torch.distributed
tensors, dynamo: ~2.5 s and ~160 MB on a 2-core machine), most of a cold start on a small GGUF,
while the file's metadata already says everything. This dataclass carries exactly the attributes
the Llama model, the rotary tables and the engine read, with transformers' meanings and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(slots=True)
class LlamaFamilyConfig:
    model_type: str  # "llama" | "qwen2" (biased Q/K/V) | "qwen3" (Q/K norm)
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
    sliding_window: int | None = None  # llama.cpp runs these architectures without one
    architectures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.architectures:
            self.architectures = [_ARCHITECTURES[self.model_type]]
