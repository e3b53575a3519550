"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied head.

Same paged contract as llama.py. Hugging Face stores GPT-2's projections as Conv1D, whose
weight is [in, out]; they are transposed once at load into nn.Linear's [out, in].
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from miaotui.errors import UnsupportedModelError
from miaotui.layers.activations import ACTIVATIONS
from miaotui.layers.attention import AttentionMetadata, PagedAttention
from miaotui.models.base import CausalLMHead
from miaotui.models.weights import WeightSink

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__()
        self.hidden = cfg.n_embd
        self.num_heads = cfg.n_head
        self.head_dim = self.hidden // self.num_heads
        scale = self.head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer + 1
        self.c_attn = nn.Linear(self.hidden, 3 * self.hidden)
        self.c_proj = nn.Linear(self.hidden, self.hidden)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(h).split(self.hidden, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, inner)
        self.c_proj = nn.Linear(inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(h)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), meta)
        return h + self.mlp(self.ln_2(h))


class GPT2LMHeadModel(CausalLMHead, nn.Module):
    tie_word_embeddings = True  # GPT-2's head is always its token embedding

    @staticmethod
    def check_config(cfg: Any) -> None:
        """What this class cannot run, found from the config alone (before anything loads)."""
        if cfg.activation_function not in ACTIVATIONS:
            raise UnsupportedModelError(f"GPT-2 activation {cfg.activation_function!r} is not supported; "
                                        f"supported: {', '.join(sorted(ACTIVATIONS))}")
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.transformer.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.transformer.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer))
        self.transformer.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            h = block(h, meta)
        return self.transformer.ln_f(h)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Take Hugging Face GPT-2 tensors, with or without the `transformer.` prefix (the
        original `gpt2` checkpoints have none); Conv1D weights are transposed to [out, in]."""
        for name, tensor in weights:
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the tied head; old checkpoints' causal-mask buffers
            if not name.startswith("transformer."):
                name = "transformer." + name
            if name.endswith(_CONV1D):
                tensor = tensor.t()
            sink.assign(name, tensor, name)
