"""The Llama family in one file: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (QKV bias), Qwen3 (per-head
Q/K RMSNorm before RoPE), SmolLM3 (RoPE skipped in the layers its config lists), Phi-3 / Phi-3.5 /
Phi-4-mini (checkpoints already fused as qkv_proj / gate_up_proj, loaded as they are; longrope and
partial rotary live in layers/rotary.py).

Follows the paged model contract: `forward(input_ids [T], positions [T], meta)` over one flat,
unpadded batch returns hidden states [T, hidden]; `compute_logits` maps only rows to sample.
Q/K/V and gate/up are fused at load (one matmul each instead of three / two).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from miaotui.errors import UnsupportedModelError
from miaotui.kernels.cpu_build import cpu_op
from miaotui.layers.activations import SiluAndMul
from miaotui.layers.attention import AttentionMetadata, PagedAttention
from miaotui.layers.norms import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding, apply_rotary, check_rope, rotary_dim
from miaotui.layers.tensor_parallel import (RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
                                            column_parallel, shard_slice)
from miaotui.models.base import CausalLMHead
from miaotui.models.decode_stack import DecodeStack
from miaotui.models.weights import WeightSink


def _sliding_window(cfg: Any, layer: int) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return window if layer_types[layer] == "sliding_attention" else None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _uses_rope(cfg: Any, layer: int) -> bool:
    """SmolLM3's `no_rope_layers` holds one flag per layer, 1 where the layer DOES apply RoPE
    (transformers' SmolLM3Attention: `use_rope = config.no_rope_layers[layer_idx]`; its config
    fills the list from `no_rope_layer_interval`: every interval-th layer has no RoPE)."""
    flags = getattr(cfg, "no_rope_layers", None)
    return True if flags is None else bool(flags[layer])


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(cfg)
        self.rotary_dim = rotary_dim(cfg, self.head_dim)  # < head_dim: Phi-4-mini's partial rotary
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
        o_bias = cfg.model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias)
        # Qwen3: one RMSNorm over head_dim, shared by all Q heads (and one by all K heads).
        self.qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.use_rope = _uses_rope(cfg, layer)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   self.head_dim**-0.5, _sliding_window(cfg, layer))
        self._cpu_rotary = cpu_op("rotary")

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = h.shape[0]
        qk, v = self.qkv_proj(h).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.reshape(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # before RoPE, as transformers' Qwen3Attention
            q_heads, k_heads = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q_heads.contiguous()), self.k_norm(k_heads.contiguous())], dim=1)
        if self.use_rope:  # Q and K heads rotated together: one rotation per layer.
            qk = apply_rotary(qk, cos, sin, self._cpu_rotary)
        qk = qk.reshape(t, -1)
        q, k = qk.split([self.q_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    """down(act(gate_up(h))) over a fused gate/up projection; `act` SiLU gating unless given
    (Gemma passes GELU-tanh gating)."""

    def __init__(self, cfg: Any, act: nn.Module | None = None) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul() if act is None else act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(h)))

    def shard_for_tensor_parallel(self, rank: int, world: int) -> None:
        """Keep rank's MLP columns: gate/up column-parallel, down row-parallel."""
        cols = shard_slice(self.intermediate, rank, world, "intermediate_size")
        up_cols = slice(self.intermediate + cols.start, self.intermediate + cols.stop)
        self.gate_up_proj = column_parallel(self.gate_up_proj, [cols, up_cols])
        self.down_proj = RowParallelLinear(self.down_proj, cols)
        self.intermediate //= world


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


# Checkpoint projection name -> (fused parameter, shard name).
_FUSED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
_FUSED_NAME = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+_proj)\.(weight|bias)$")


class LlamaForCausalLM(CausalLMHead, nn.Module):
    @staticmethod
    def check_config(cfg: Any) -> None:
        """What this class cannot run, found from the config alone (before anything loads)."""
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"activation {act!r} is not supported for Llama-family models")
        check_rope(cfg, _head_dim(cfg))
        flags = getattr(cfg, "no_rope_layers", None)
        if flags is not None and (len(flags) != cfg.num_hidden_layers or any(f not in (0, 1) for f in flags)):
            raise UnsupportedModelError(
                f"no_rope_layers must hold one 0/1 flag per layer ({cfg.num_hidden_layers}), got {list(flags)!r}")

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        head_dim = self.model.layers[0].self_attn.head_dim
        with torch.device("cpu"):  # a real buffer even when the model is built on "meta"
            self.rotary = RotaryEmbedding(cfg, head_dim)
        # Decode-only CPU steps in one kernel call where every layer allows it (models/decode_stack.py).
        self.decode_stack: DecodeStack | None = DecodeStack(self.model.layers, cfg.rms_norm_eps)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        stacked = self.decode_stack(h, cos, sin, meta) if self.decode_stack is not None else None
        if stacked is not None:
            return self.model.norm(stacked)
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta)
        return self.model.norm(h)

    def shard_for_tensor_parallel(self, rank: int, world: int) -> None:
        """Keep rank's shard: its query and KV heads (QKV column-parallel, O row-parallel), its
        MLP columns (gate/up column-parallel, down row-parallel; a MoE block shards its experts
        alike), its vocabulary rows of the embedding and of the head. Head counts and the
        intermediate size must split evenly."""
        for layer in self.model.layers:
            attn = layer.self_attn
            hd = attn.head_dim
            heads = shard_slice(attn.num_heads, rank, world, "num_attention_heads")
            kv = shard_slice(attn.num_kv_heads, rank, world, "num_key_value_heads")
            q_rows = slice(heads.start * hd, heads.stop * hd)
            k_rows = slice(attn.q_size + kv.start * hd, attn.q_size + kv.stop * hd)
            v_rows = slice(attn.q_size + attn.kv_size + kv.start * hd, attn.q_size + attn.kv_size + kv.stop * hd)
            attn.qkv_proj = column_parallel(attn.qkv_proj, [q_rows, k_rows, v_rows])
            attn.o_proj = RowParallelLinear(attn.o_proj, q_rows)
            attn.num_heads //= world
            attn.num_kv_heads //= world
            attn.q_size //= world
            attn.kv_size //= world
            attn.attn.num_heads, attn.attn.num_kv_heads = attn.num_heads, attn.num_kv_heads
            layer.mlp.shard_for_tensor_parallel(rank, world)  # LlamaMLP's, or a MoE block's own
        head = self.model.embed_tokens.weight.data if self.tie_word_embeddings else self.lm_head.weight.data
        self.lm_head = VocabParallelHead(head, self.config.vocab_size, rank, world)
        self.model.embed_tokens = VocabParallelEmbedding(self.model.embed_tokens, rank, world)
        self.tie_word_embeddings = False  # each rank's head slice is its own parameter now
        self.decode_stack = None  # the kernel has no all-reduce between a layer's halves

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Take Hugging Face-named tensors; fuse Q/K/V and gate/up into their shared parameters."""
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            match = _FUSED_NAME.match(name)
            if match and match.group(2) in _FUSED:
                prefix, proj, kind = match.groups()
                fused, shard = _FUSED[proj]
                if fused == "qkv_proj":
                    offsets = {"q": 0, "k": attn.q_size, "v": attn.q_size + attn.kv_size}
                    shards = ("q", "k", "v")
                else:
                    offsets = {"gate": 0, "up": self.config.intermediate_size}
                    shards = ("gate", "up")
                sink.copy_shard(f"{prefix}.{fused}.{kind}", tensor, offsets[shard], shard, shards, name)
            else:
                sink.assign(name, tensor, name)
