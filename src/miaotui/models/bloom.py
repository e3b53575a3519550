"""BLOOM: ALiBi attention (no position embeddings), LayerNorm after the word embeddings, tied head.

Same paged contract as llama.py. The checkpoint's fused query_key_value interleaves per head
([head][q|k|v][head_dim] rows); it is regrouped once at load into [q heads | k heads | v heads]
so the forward pass splits it with one `split`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.layers.attention import AttentionMetadata, PagedAttention
from miaotui.layers.position_bias import AlibiBias
from miaotui.models.base import CausalLMHead
from miaotui.models.weights import WeightSink


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head ALiBi slopes of the BLOOM paper (and transformers' build_alibi_tensor):
    a geometric sequence for the largest power of two <= num_heads, interleaved extras beyond."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.n_head
        self.head_dim = self.hidden // self.num_heads
        self.query_key_value = nn.Linear(self.hidden, 3 * self.hidden)
        self.dense = nn.Linear(self.hidden, self.hidden)
        with torch.device("cpu"):  # a real tensor even when the model is built on "meta"
            slopes = alibi_slopes(self.num_heads)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5,
                                   score_bias=AlibiBias(slopes))

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(h).split(self.hidden, dim=-1)
        return self.dense(self.attn(q, k, v, meta))


class BloomBlock(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.mlp.dense_4h_to_h = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)
        self.post_ln_residual = bool(getattr(cfg, "apply_residual_connection_post_layernorm", False))

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(h)
        h = self.self_attention(normed, meta) + (normed if self.post_ln_residual else h)
        normed = self.post_attention_layernorm(h)
        mlp = self.mlp.dense_4h_to_h(F.gelu(self.mlp.dense_h_to_4h(normed), approximate="tanh"))
        return mlp + (normed if self.post_ln_residual else h)


class BloomForCausalLM(CausalLMHead, nn.Module):
    tie_word_embeddings = True

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.Module()
        self.transformer.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.transformer.h = nn.ModuleList(BloomBlock(cfg) for _ in range(cfg.n_layer))
        self.transformer.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def attention_layers(self) -> list[PagedAttention]:
        return [block.self_attention.attn for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))
        for block in self.transformer.h:
            h = block(h, meta)
        return self.transformer.ln_f(h)

    def _regroup_qkv(self, tensor: torch.Tensor) -> torch.Tensor:
        """[heads, 3, head_dim, ...] rows -> [3, heads, head_dim, ...]."""
        heads = self.config.n_head
        dim = self.config.hidden_size // heads
        return tensor.reshape(heads, 3, dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Hugging Face BLOOM tensors, with or without the `transformer.` prefix."""
        for name, tensor in weights:
            if name == "lm_head.weight":
                continue  # tied to the word embeddings
            if not name.startswith("transformer."):
                name = "transformer." + name
            if ".query_key_value." in name:
                tensor = self._regroup_qkv(tensor)
            sink.assign(name, tensor, name)
