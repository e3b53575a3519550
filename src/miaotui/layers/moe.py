"""Mixture-of-experts MLP: a top-k router and experts that each multiply only the tokens routed
to them.

Routing follows transformers' TopKRouter (Mixtral, Qwen3-MoE): softmax of the router logits in
fp32, top-k of the probabilities (torch.topk's order), renormalised over the k where the config
says so; Qwen3-MoE then rounds the weights to the model dtype, Mixtral keeps them fp32 and
rounds the weighted expert output instead. gpt-oss (GptOssTopKRouter) takes the top-k of the
logits themselves (its router has a bias) and a softmax over those k in the logits' dtype.
Its experts have biases and a clamped SwiGLU (activations.py's ClampedSwiGLU).

Per step, the (token, expert) pairs are sorted by expert (stable, so each expert's tokens keep
batch order) and every expert with tokens runs once on its rows: an expert's weights are read
once per step, experts no token chose are never touched (batched decode reads the union of the
routed experts), and each expert is an ordinary linear pair, so int4 / int8 quantization and a
GGUF file's 4-bit experts reuse the dense layers' kernels unchanged. Outputs are accumulated in
increasing expert order, as the reference's loop does, so fp32 sums round alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from miaotui.layers.activations import ClampedSwiGLU, SiluAndMul


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]) of router logits [T, E]: fp32 weights, or with
    `softmax_after_topk` (gpt-oss) a softmax over the k largest logits, in the logits' dtype."""
    if softmax_after_topk:
        top, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), ids
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Router(nn.Linear):
    """The router's [E, hidden] projection: kept in the model dtype when the rest is quantized
    (`keep_dense`; layers/quantized.py skips it), as it decides every token's experts."""

    keep_dense = True


class Expert(nn.Module):
    """One expert: down(act(gate_up(h))) over a fused gate/up projection (gate rows first); `act`
    SiLU gating unless given (gpt-oss: ClampedSwiGLU, with biases on both projections)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, act: nn.Module | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = SiluAndMul() if act is None else act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(h)))


class SparseMoE(nn.Module):
    """Router `gate` [E, hidden] (never quantized: it decides every route) and `experts`.
    `weights_in_model_dtype`: Qwen3-MoE's rounding of the routing weights (see the module doc).
    gpt-oss: `softmax_after_topk`, a router with a bias, experts with biases and `make_act()` as
    their activation. `experts_run` counts expert multiplications, for tests and statistics."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 weights_in_model_dtype: bool, softmax_after_topk: bool = False, bias: bool = False,
                 make_act: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
        self.gate = Router(hidden, num_experts, bias=bias)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, bias, None if make_act is None else make_act())
                                     for _ in range(num_experts))
        self.top_k, self.renormalize = top_k, renormalize
        self.weights_in_model_dtype = weights_in_model_dtype
        self.softmax_after_topk = softmax_after_topk
        self.experts_run = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.softmax_after_topk)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // self.top_k  # the token of each sorted (token, expert) pair
        pair_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            y = expert(x[rows]) * pair_weights[start:start + count, None]
            out.index_add_(0, rows, y.to(x.dtype))
            start += count
            self.experts_run += 1
        return out.reshape(shape)


def moe_block(cfg: Any, layer: int) -> SparseMoE | None:
    """Layer `layer`'s MoE block as the config lays them out, or None for a dense MLP layer."""
    model_type = getattr(cfg, "model_type", "")
    if model_type == "mixtral":
        return SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                         renormalize=True, weights_in_model_dtype=False)
    if model_type == "qwen3_moe":
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        if layer in (getattr(cfg, "mlp_only_layers", None) or []) or cfg.num_experts == 0 or (layer + 1) % step:
            return None
        return SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                         renormalize=bool(cfg.norm_topk_prob), weights_in_model_dtype=True)
    if model_type == "gpt_oss":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit
        return SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                         renormalize=False, weights_in_model_dtype=False, softmax_after_topk=True, bias=True,
                         make_act=lambda: ClampedSwiGLU(alpha, limit))
    raise ValueError(f"no mixture-of-experts layout for model_type {model_type!r}")
