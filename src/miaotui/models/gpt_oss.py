"""gpt-oss (GptOssForCausalLM), as transformers' modeling_gpt_oss computes it: Llama-shaped
attention with biases on Q/K/V and O, alternating sliding-window and full layers
(`layer_types`), YaRN RoPE (layers/rotary.py) and attention sinks (one learned logit per head in
each softmax's denominator: PagedAttention's explicit-score path); every layer's MLP is a
mixture of experts (layers/moe.py) whose router has a bias and takes the top-k logits before a
softmax over them, with biased experts and a clamped SwiGLU ((up + 1) * gate * sigmoid(alpha gate)).

Checkpoint layout (transformers' save_pretrained; dense tensors, not MXFP4):
`mlp.router.{weight,bias}` -> the SparseMoE router `mlp.gate`; the experts stacked and stored
transposed for `x @ W`: `mlp.experts.gate_up_proj` [E, H, 2I] with gate and up INTERLEAVED along
the last axis (column 2j is gate j, 2j + 1 is up j), `gate_up_proj_bias` [E, 2I] likewise, and
`down_proj` [E, I, H], `down_proj_bias` [E, H]. Each expert's fused gate_up_proj is loaded with
gate rows first (the layout every expert here has), so the activation splits halves; the
product of each column is unchanged. `self_attn.sinks` [heads] -> `self_attn.attn.sinks`.

In bf16 the norms weight the fp32 rows before rounding (Fp32ScaleRMSNorm; transformers keeps
gpt-oss's norms in fp32), and attention's scores and softmax stay in the model dtype as the
reference's eager attention does. transformers' default experts implementation (grouped_mm)
sums each token's k expert outputs per token, its eager loop (and layers/moe.py) accumulates
them in expert order: the same in fp32 to the last bits, not bit for bit in bf16.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from miaotui.errors import UnsupportedModelError
from miaotui.layers.attention import PagedAttention
from miaotui.layers.norms import Fp32ScaleRMSNorm
from miaotui.models.moe import MoEForCausalLM
from miaotui.models.weights import WeightSink

_LAYER_TYPES = ("sliding_attention", "full_attention")
_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")
_ROUTER = re.compile(r"^(model\.layers\.\d+)\.mlp\.router\.(weight|bias)$")
_SINKS = re.compile(r"^(model\.layers\.\d+\.self_attn)\.sinks$")


def _gate_first(t: torch.Tensor) -> torch.Tensor:
    """Rows [2I, ...] interleaved gate/up (gate j at 2j, up j at 2j + 1) -> gate rows, then up rows."""
    return torch.cat([t[0::2], t[1::2]], dim=0)


class GptOssForCausalLM(MoEForCausalLM):
    @staticmethod
    def check_config(cfg: Any) -> None:
        quant = getattr(cfg, "quantization_config", None) or {}
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if method is not None:
            raise UnsupportedModelError(
                f"gpt-oss checkpoints quantized with {method!r} (the released MXFP4 experts) are not supported "
                "yet; use a checkpoint saved with dense (bf16/fp32) weights")
        MoEForCausalLM.check_config(cfg)
        types = list(getattr(cfg, "layer_types", None) or [])
        if len(types) != cfg.num_hidden_layers or any(t not in _LAYER_TYPES for t in types):
            raise UnsupportedModelError(f"layer_types must name one of {', '.join(_LAYER_TYPES)} per layer "
                                        f"({cfg.num_hidden_layers}), got {types!r}")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        eps = cfg.rms_norm_eps
        for layer in self.model.layers:
            old = layer.self_attn.attn  # Llama's: the scale (head_dim ** -0.5) and the layer type's window
            layer.self_attn.attn = PagedAttention(old.num_heads, old.num_kv_heads, old.head_dim, old.scale,
                                                  old.sliding_window, sinks=True)
            layer.input_layernorm = Fp32ScaleRMSNorm(cfg.hidden_size, eps)
            layer.post_attention_layernorm = Fp32ScaleRMSNorm(cfg.hidden_size, eps)
        self.model.norm = Fp32ScaleRMSNorm(cfg.hidden_size, eps)

    def shard_for_tensor_parallel(self, rank: int, world: int) -> None:
        raise UnsupportedModelError("tensor parallelism does not shard gpt-oss yet (its attention sinks and "
                                    "biased experts); run it with tensor_parallel_size 1")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Route gpt-oss's router, stacked experts and sinks; the rest (fused Q/K/V with biases,
        norms, embeddings, head) is the Llama family's."""
        def rest():
            for name, tensor in weights:
                if (match := _ROUTER.match(name)) is not None:
                    sink.assign(f"{match.group(1)}.mlp.gate.{match.group(2)}", tensor, name)
                elif (match := _SINKS.match(name)) is not None:
                    sink.assign(f"{match.group(1)}.attn.sinks", tensor, name)
                elif (match := _EXPERTS.match(name)) is not None:
                    prefix, proj, bias = match.groups()
                    for e in range(tensor.shape[0]):
                        # Stored for x @ W: a weight [in, out] is the transpose of nn.Linear's [out, in].
                        part = tensor[e] if bias else tensor[e].t()
                        if proj == "gate_up_proj":
                            part = _gate_first(part)
                        kind = "bias" if bias else "weight"
                        sink.assign(f"{prefix}.mlp.experts.{e}.{proj}.{kind}", part.contiguous(), f"{name}[{e}]")
                else:
                    yield name, tensor

        super().load_weights(rest(), sink)
