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

Tensor parallelism (`shard_for_tensor_parallel`): every rank keeps the whole router, so all
ranks route alike (their inputs are equal after the attention's all-reduce), and its share of
every expert's intermediate columns (gate/up rows column-parallel, down columns row-parallel
without a reduce of its own). The weighted per-expert partial outputs are summed as above and the
block's sum is all-reduced once: one collective per layer however many experts ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from miaotui.errors import UnsupportedModelError
from miaotui.layers.activations import ClampedSwiGLU, SiluAndMul
from miaotui.layers.tensor_parallel import AllReduce, column_parallel, input_parallel


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
    `intermediate_name`: the config key of the expert width, for errors. gpt-oss:
    `softmax_after_topk`, a router with a bias, experts with biases and `make_act()` as their
    activation. `experts_run` counts expert multiplications, for tests and statistics."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 weights_in_model_dtype: bool, intermediate_name: str = "intermediate_size",
                 softmax_after_topk: bool = False, bias: bool = False,
                 make_act: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
        self.gate = Router(hidden, num_experts, bias=bias)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, bias, None if make_act is None else make_act())
                                     for _ in range(num_experts))
        self.top_k, self.renormalize = top_k, renormalize
        self.weights_in_model_dtype = weights_in_model_dtype
        self.intermediate, self.intermediate_name = intermediate, intermediate_name
        self.reduce: AllReduce | None = None  # set when sharded: sums the ranks' partial outputs
        self.softmax_after_topk = softmax_after_topk
        self.experts_run = 0

    def check_split(self, world: int) -> None:
        """The experts' width must split evenly over `world` ranks."""
        if self.intermediate % world:
            raise UnsupportedModelError(
                f"tensor parallelism: {self.intermediate_name} ({self.intermediate}, the experts' width) is not "
                f"divisible by tensor_parallel_size {world}")

    def shard_for_tensor_parallel(self, rank: int, world: int) -> None:
        """Keep rank's share of every expert's intermediate columns (see the module doc)."""
        self.check_split(world)
        part = self.intermediate // world
        cols = slice(rank * part, (rank + 1) * part)
        up_cols = slice(self.intermediate + cols.start, self.intermediate + cols.stop)
        for expert in self.experts:
            expert.gate_up_proj = column_parallel(expert.gate_up_proj, [cols, up_cols])
            expert.down_proj = input_parallel(expert.down_proj, cols)  # reduced once, in forward
        self.intermediate = part
        self.reduce = AllReduce()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.softmax_after_topk)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        out = self._one_token(x, weights, ids) if x.shape[0] == 1 else self._grouped(x, weights, ids)
        if self.reduce is not None:  # every rank reaches this, whichever experts ran
            out = self.reduce(out)
        return out.reshape(shape)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: the token's k experts, no grouping (the same sums, in expert order)."""
        out = torch.zeros_like(x)
        for slot in sorted(range(self.top_k), key=ids[0].tolist().__getitem__):
            out += (self.experts[int(ids[0, slot])](x) * weights[0, slot]).to(x.dtype)
            self.experts_run += 1
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(token, expert) pairs sorted by expert; each expert with tokens runs once on its rows."""
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
        return out


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
                         renormalize=bool(cfg.norm_topk_prob), weights_in_model_dtype=True,
                         intermediate_name="moe_intermediate_size")
    if model_type == "gpt_oss":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit
        return SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                         renormalize=False, weights_in_model_dtype=False, softmax_after_topk=True, bias=True,
                         make_act=lambda: ClampedSwiGLU(alpha, limit))
    raise ValueError(f"no mixture-of-experts layout for model_type {model_type!r}")
