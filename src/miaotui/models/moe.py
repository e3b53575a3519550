"""Mixture-of-experts members of the Llama family: Mixtral and Qwen3-MoE. Attention, norms,
RoPE, embeddings and the head are models/llama.py's (Qwen3-MoE has Qwen3's per-head Q/K norm);
each MoE layer's MLP is a layers/moe.py SparseMoE (Qwen3-MoE's `mlp_only_layers` and
`decoder_sparse_step` keep some layers dense). Tensor parallelism shards attention and dense
layers as Llama does and each expert by its intermediate columns, with one all-reduce per MoE
block (layers/moe.py).

Checkpoints name experts three ways, all loaded into each expert's fused gate/up and down:
per-expert `mlp.experts.E.{gate,up,down}_proj` (Qwen3-MoE), `block_sparse_moe.experts.E.w1/w3/w2`
with the router at `block_sparse_moe.gate` (Mixtral), and transformers 5's stacked
`mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I].
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from miaotui.errors import UnsupportedModelError
from miaotui.layers.moe import SparseMoE, moe_block
from miaotui.models.llama import LlamaForCausalLM
from miaotui.models.weights import WeightSink

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
# Per-expert projection -> (this model's parameter, gate/up shard or None).
_EXPERT_PROJ = {"gate_proj": ("gate_up_proj", "gate"), "w1": ("gate_up_proj", "gate"),
                "up_proj": ("gate_up_proj", "up"), "w3": ("gate_up_proj", "up"),
                "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


class MoEForCausalLM(LlamaForCausalLM):
    @staticmethod
    def check_config(cfg: Any) -> None:
        LlamaForCausalLM.check_config(cfg)
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0)
        top_k = getattr(cfg, "num_experts_per_tok", 0)
        if experts and not 0 < top_k <= experts:
            raise UnsupportedModelError(f"num_experts_per_tok {top_k} must be in 1..{experts} (the experts)")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        for i, layer in enumerate(self.model.layers):
            block = moe_block(cfg, i)
            if block is not None:
                layer.mlp = block
        # The decode kernel runs dense MLPs only.
        self.decode_stack = None

    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def shard_for_tensor_parallel(self, rank: int, world: int) -> None:
        """Llama's sharding; each MoE block keeps its share of every expert (layers/moe.py).
        The experts' width is checked first, so an uneven one fails before anything is cut."""
        for block in self.moe_blocks():
            block.check_split(world)
        super().shard_for_tensor_parallel(rank, world)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Route expert and router tensors to each expert's parameters; the rest is Llama's."""
        def dense():
            for name, tensor in weights:
                if (match := _ROUTER.match(name)) is not None:
                    sink.assign(f"{match.group(1)}.mlp.gate.weight", tensor, name)
                elif (match := _PER_EXPERT.match(name)) is not None and match.group(3) in _EXPERT_PROJ:
                    self._load_expert(sink, f"{match.group(1)}.mlp.experts.{match.group(2)}", match.group(3),
                                      tensor, name)
                elif (match := _STACKED.match(name)) is not None:
                    for e in range(tensor.shape[0]):
                        prefix = f"{match.group(1)}.mlp.experts.{e}"
                        sink.assign(f"{prefix}.{match.group(2)}.weight", tensor[e], f"{name}[{e}]")
                else:
                    yield name, tensor

        super().load_weights(dense(), sink)

    def _load_expert(self, sink: WeightSink, prefix: str, proj: str, tensor: torch.Tensor, source: str) -> None:
        param, shard = _EXPERT_PROJ[proj]
        if shard is None:
            sink.assign(f"{prefix}.{param}.weight", tensor, source)
            return
        expert = self.get_submodule(prefix)
        intermediate = expert.down_proj.in_features
        sink.copy_shard(f"{prefix}.{param}.weight", tensor, 0 if shard == "gate" else intermediate, shard,
                        ("gate", "up"), source)
