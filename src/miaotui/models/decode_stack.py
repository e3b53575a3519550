"""A Llama-family model's decode steps on the CPU as one call of miaotui's `decode_stack`
kernel (kernels/cpu_decode_stack.cpp) instead of ~15 module calls and op dispatches per layer.

The kernel calls the very kernels the layers call, in the same order, so a step's hidden
states are bit for bit the eager layers' (tests/unit/test_decode_stack.py). It serves steps
whose every token is a decode of an fp32 CPU model whose layers all run on miaotui's CPU
kernels: 4-bit or int8 projections (`Int4Linear` "q4" / `Int8Linear` "q8" / `Int8GroupLinear`), no bias but
Q/K/V's, the RMSNorm kernel (also for Qwen3's per-head Q/K norms, one eps for every norm), plain causal
attention over fp32 or fp16 caches and RoPE in every layer. Anything else (prompt chunks, sliding windows,
SmolLM3's RoPE-less layers, Phi-4-mini's partial rotary, torch's int4 kernel, a sharded model,
--compile-decode) keeps the layers' own forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from miaotui.kernels.cpu_build import cpu_op
from miaotui.layers.attention import CPU_DECODE_CACHE_DTYPES, AttentionMetadata
from miaotui.layers.norms import RMSNorm
from miaotui.layers.quantized import Int4Linear, Int8GroupLinear, Int8Linear

logger = logging.getLogger("miaotui")

_EMPTY = torch.empty(0)


def _linear_tensors(linear: nn.Module, with_bias: bool) -> list[torch.Tensor] | None:
    """(weight, scales[, bias]) as the kernel takes them, or None where the kernel cannot run it."""
    if isinstance(linear, Int4Linear) and linear.own_kernel:
        tensors = [linear.blocks, _EMPTY]
    elif isinstance(linear, Int8Linear) and linear.own_kernel:
        tensors = [linear.qweight, linear.scales]
    elif isinstance(linear, Int8GroupLinear):
        tensors = [linear.codes, linear.group_scales]
    else:
        return None
    if linear.bias is not None and not with_bias:
        return None
    if with_bias:
        tensors.append(_EMPTY if linear.bias is None else linear.bias.float().contiguous())
    return tensors


def _norm_weight(norm: nn.Module, eps: float) -> torch.Tensor | None:
    # Exactly RMSNorm: a subclass (Gemma's OffsetRMSNorm scales by 1 + w) computes something else.
    ok = (type(norm) is RMSNorm and norm._cpu_rms_norm is not None and norm.eps == eps
          and norm.weight.dtype is torch.float32)
    return norm.weight.contiguous() if ok else None


def _layer_tensors(layer: nn.Module, eps: float) -> list[torch.Tensor] | None:
    """The kernel's 13 tensors of one decoder layer (kernels/cpu_decode_stack.cpp, `Slot`)."""
    attn, mlp = layer.self_attn, layer.mlp
    paged = attn.attn
    if (paged.sliding_window is not None or paged.score_bias is not None or paged.softcap is not None
            or paged.sinks is not None or attn.head_dim % 8):
        return None  # the kernel's attention is plain causal softmax attention
    # The kernel rotates Q/K (after their per-head norms, if any) in every layer, and whole heads
    # (its rotate_half pairs channel i with i + head_dim/2, not i + rotary_dim/2).
    if not getattr(attn, "use_rope", True) or getattr(attn, "rotary_dim", attn.head_dim) != attn.head_dim:
        return None
    qk_norms = [_EMPTY, _EMPTY]
    if getattr(attn, "qk_norm", False):
        qk_norms = [_norm_weight(attn.q_norm, eps), _norm_weight(attn.k_norm, eps)]
    parts = [[_norm_weight(layer.input_layernorm, eps)], _linear_tensors(attn.qkv_proj, True), qk_norms,
             _linear_tensors(attn.o_proj, False), [_norm_weight(layer.post_attention_layernorm, eps)],
             _linear_tensors(mlp.gate_up_proj, False), _linear_tensors(mlp.down_proj, False)]
    if any(part is None or any(tensor is None for tensor in part) for part in parts):
        return None
    return [tensor for part in parts for tensor in part]


class DecodeStack:
    """Runs a Llama-family model's decoder layers for a decode-only step in one kernel call.
    `__call__` returns the last layer's hidden states, or None where the step or the model is
    not one the kernel serves (the caller then runs its layers)."""

    def __init__(self, layers: nn.ModuleList, eps: float) -> None:
        self._layers = layers
        self._eps = eps
        self._op = cpu_op("decode_stack")
        self._weights: list[torch.Tensor] | None = None  # resolved at the first decode step
        self._caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.enabled = self._op is not None

    def _resolve(self) -> bool:
        if self._weights is None:
            per_layer = [_layer_tensors(layer, self._eps) for layer in self._layers]
            if not per_layer or any(tensors is None for tensors in per_layer):
                logger.debug("decode stack kernel off: a layer is not one it runs")
                self.enabled = False
                return False
            self._weights = [tensor for tensors in per_layer for tensor in tensors]
        first = self._layers[0].self_attn.attn.k_cache
        if self._caches is None or self._caches[0][0] is not first:  # bound (or re-bound) by the runner
            paged = [layer.self_attn.attn for layer in self._layers]
            caches = [attn.k_cache for attn in paged], [attn.v_cache for attn in paged]
            if any(c is None or c.dtype not in CPU_DECODE_CACHE_DTYPES or c.device.type != "cpu"
                   or not c.is_contiguous()
                   for group in caches for c in group):
                self.enabled = False
                return False
            self._caches = caches
        return True

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: Any) -> torch.Tensor | None:
        if not self.enabled or not isinstance(meta, AttentionMetadata) or meta.cross is not None:
            return None
        decode = meta.decode
        if (decode is None or decode.token_idx.numel() != h.shape[0] or h.dtype is not torch.float32
                or h.device.type != "cpu" or cos.dtype is not torch.float32 or not self._resolve()):
            return None
        attn = self._layers[0].self_attn
        rows = h.shape[0]
        return self._op(h, cos.contiguous(), sin.contiguous(), self._weights, self._caches[0], self._caches[1],
                        meta.slot_mapping, decode.blocks.view(rows, -1), decode.seq_lens.view(-1),
                        attn.num_heads, attn.num_kv_heads, attn.attn.scale, self._eps)
