"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from miaotui.errors import UnsupportedModelError
from miaotui.models.bloom import BloomForCausalLM
from miaotui.models.gemma import GemmaForCausalLM
from miaotui.models.gpt2 import GPT2LMHeadModel
from miaotui.models.gpt_oss import GptOssForCausalLM
from miaotui.models.llama import LlamaForCausalLM
from miaotui.models.moe import MoEForCausalLM
from miaotui.models.t5 import T5ForConditionalGeneration

_MODELS: dict[str, type[nn.Module]] = {
    "BloomForCausalLM": BloomForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Gemma3ForConditionalGeneration": GemmaForCausalLM,  # its language model; images are not read
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GptOssForCausalLM": GptOssForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoEForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,  # a Llama with pre-fused projections, longrope, partial rotary
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM,
    "SmolLM3ForCausalLM": LlamaForCausalLM,
    "MT5ForConditionalGeneration": T5ForConditionalGeneration,
    "T5ForConditionalGeneration": T5ForConditionalGeneration,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(hf_config: Any) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return _MODELS[arch]
    found = ", ".join(archs) or f"none listed (model_type {getattr(hf_config, 'model_type', '?')!r})"
    raise UnsupportedModelError(
        f"unsupported architecture: {found}; supported: {', '.join(supported_architectures())}"
    )
