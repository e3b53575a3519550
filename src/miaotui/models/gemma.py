"""Gemma 2 and Gemma 3 text models (Gemma2ForCausalLM, Gemma3ForCausalLM, and the language model
of Gemma3ForConditionalGeneration checkpoints), as transformers' modeling_gemma2 / modeling_gemma3:

- (1 + w) RMSNorms (layers/norms.py: OffsetRMSNorm), four per layer: before and after attention,
  before and after the MLP; the post-norms apply to the branch before the residual add;
- embeddings scaled by sqrt(hidden_size), that factor rounded to the weights' dtype first;
- a GELU-tanh gated MLP; attention scaled by query_pre_attn_scalar ** -0.5 instead of head_dim;
- layers alternate sliding-window and global attention (`layer_types`); Gemma 3 gives each kind
  its own RoPE (rope_parameters per layer type: base 10k local, 1M global, linear scaling on the
  global layers of the larger models) and RMS-normalises Q and K per head before RoPE;
- Gemma 2 soft-caps attention scores (attn_logit_softcapping, layers/explicit_attention.py) and
  the final logits (final_logit_softcapping): cap * tanh(x / cap).

Same paged contract and the same fused Q/K/V and gate/up parameters as models/llama.py, whose
attention forward, gated MLP, weight loading and tensor-parallel sharding this reuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from miaotui.errors import UnsupportedModelError
from miaotui.kernels.cpu_build import cpu_op
from miaotui.layers.activations import GeluTanhAndMul
from miaotui.layers.attention import AttentionMetadata, PagedAttention
from miaotui.layers.norms import OffsetRMSNorm
from miaotui.layers.rotary import RotaryEmbedding, check_rope, rope_parameters
from miaotui.models.base import CausalLMHead
from miaotui.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from miaotui.models.weights import WeightSink

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _layer_types(cfg: Any) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types is None:  # configs older than layer_types: Gemma 2 alternates, local first
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers)]
    return list(types)


def _rope_config(cfg: Any, layer_type: str) -> Any:
    """A config-like object holding one layer type's RoPE settings, for layers/rotary.py.

    transformers >= 5 nests Gemma 3's rope_parameters by layer type; older versions kept
    rope_theta (+ rope_scaling) for the global layers and rope_local_base_freq for the local ones."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params:
        chosen = dict(params[layer_type] or {"rope_type": "default"})
    elif cfg.model_type.startswith("gemma3") and layer_type == "sliding_attention":
        chosen = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_local_base_freq", 10000.0)}
    else:
        chosen = rope_parameters(cfg)
    return SimpleNamespace(rope_parameters=chosen, max_position_embeddings=cfg.max_position_embeddings)


class GemmaAttention(LlamaAttention):
    """Gemma's attention is Llama's forward (fused Q/K/V, optional per-head Q/K norm, RoPE, paged
    attention) over its own construction: query_pre_attn_scalar scaling, the layer type's window,
    soft-capping, (1 + w) Q/K norms. __init__ sets every attribute that forward reads."""

    def __init__(self, cfg: Any, layer: int) -> None:
        nn.Module.__init__(self)
        self.layer_type = _layer_types(cfg)[layer]
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = _head_dim(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.qk_norm = cfg.model_type.startswith("gemma3")
        if self.qk_norm:
            self.q_norm = OffsetRMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = OffsetRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.use_rope = True
        window = cfg.sliding_window if self.layer_type == "sliding_attention" else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   float(cfg.query_pre_attn_scalar) ** -0.5, window,
                                   softcap=getattr(cfg, "attn_logit_softcapping", None))
        self._cpu_rotary = cpu_op("rotary")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg, GeluTanhAndMul())
        eps = cfg.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, meta))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


# Gemma3ForConditionalGeneration checkpoints: the language model under its own prefix (two
# layouts across transformers versions); the vision tower and projector are not loaded.
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))
_VISION = re.compile(r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.")


def text_weights(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """A checkpoint's language-model tensors under Gemma3ForCausalLM's names."""
    for name, tensor in weights:
        if _VISION.match(name):
            continue
        for old, new in _MULTIMODAL_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        yield name, tensor


class GemmaForCausalLM(CausalLMHead, nn.Module):
    @staticmethod
    def check_config(cfg: Any) -> None:
        """What this class cannot run, found from the config alone (before anything loads)."""
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"activation {act!r} is not supported for Gemma models; "
                                        f"supported: {', '.join(_ACTIVATIONS)}")
        types = _layer_types(cfg)
        if len(types) != cfg.num_hidden_layers or any(t not in _LAYER_TYPES for t in types):
            raise UnsupportedModelError(
                f"layer_types must name one of {', '.join(_LAYER_TYPES)} per layer ({cfg.num_hidden_layers}), "
                f"got {types!r}")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError("use_bidirectional_attention (an embedding model's encoder) is not "
                                        "supported; miaotui runs Gemma as a causal language model")
        for layer_type in sorted(set(types)):
            check_rope(_rope_config(cfg, layer_type), _head_dim(cfg))

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layer_types = _layer_types(cfg)
        with torch.device("cpu"):  # real buffers even when the model is built on "meta"
            self.rotary = nn.ModuleDict({t: RotaryEmbedding(_rope_config(cfg, t), _head_dim(cfg))
                                         for t in sorted(set(self.layer_types))})
        self.embed_scale = float(cfg.hidden_size) ** 0.5
        self.decode_stack = None  # the CPU decode stack serves Llama-shaped layers only

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        # transformers multiplies by the scale as a tensor of the weights' dtype (bf16-rounded in bf16).
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        tables = {t: rotary.cos_sin(positions, h.dtype) for t, rotary in self.rotary.items()}
        for layer, layer_type in zip(self.model.layers, self.layer_types):
            h = layer(h, *tables[layer_type], meta)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    # Same parameter layout as the Llama family: its sharding and fused loading apply as they are.
    shard_for_tensor_parallel = LlamaForCausalLM.shard_for_tensor_parallel

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        LlamaForCausalLM.load_weights(self, text_weights(weights), sink)
