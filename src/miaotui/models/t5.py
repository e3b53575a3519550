"""T5 (v1.0 and v1.1 / flan / mT5): an encoder-decoder on the same paged contract.

`encode` runs the encoder once per request (the runner calls it when a request is first
scheduled) and leaves each decoder layer's cross-attention K/V on the request's EncoderState.
`forward` is the decoder over a flat batch: self-attention on the paged KV cache (unscaled,
with T5's causal relative-position bias), then cross-attention over each sequence's own encoder
K/V (`meta.cross`, see layers/cross_attention.py), then the feed-forward.

T5 specifics: RMS-style LayerNorm without bias, no 1/sqrt(d) attention scaling, one learned
relative-position bias per stack (learned in layer 0, reused by all), ReLU (v1.0) or gated
GELU (v1.1) feed-forward, and v1.0 scales the decoder output by d_model^-0.5 before its tied
head. Q/K/V of self-attention and K/V of cross-attention are fused at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.errors import ModelLoadError, UnsupportedModelError
from miaotui.layers.activations import ACTIVATIONS
from miaotui.layers.attention import AttentionMetadata, PagedAttention
from miaotui.layers.cross_attention import cross_attention
from miaotui.layers.norms import RMSNorm
from miaotui.layers.position_bias import RelativePositionBias
from miaotui.models.base import CausalLMHead
from miaotui.models.weights import WeightSink
from miaotui.request import EncoderState


class T5FeedForward(nn.Module):
    """wo(act(wi(h))), or gated: wo(act(wi_0(h)) * wi_1(h)) with wi = [wi_0; wi_1] fused."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.gated = bool(cfg.is_gated_act)
        self.wi = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.wi(h).chunk(2, dim=-1)
            return self.wo(self.act(gate) * up)
        return self.wo(self.act(self.wi(h)))


class T5SelfAttention(nn.Module):
    """Fused QKV and output projection; `paged` (decoder) or plain bidirectional (encoder)."""

    def __init__(self, cfg: Any, paged: PagedAttention | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
        self.inner = cfg.num_heads * cfg.d_kv
        self.qkv = nn.Linear(cfg.d_model, 3 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)
        self.paged = paged

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv(h).split(self.inner, dim=-1)
        return self.o(self.paged(q, k, v, meta))

    def encode(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [B, S, d_model], mask [B, H, S, S] (float: bias, -inf at padding) -> [B, S, d_model]."""
        b, s, _ = h.shape
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(h).split(self.inner, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, s, self.inner))


class T5CrossAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
        self.inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, self.inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * self.inner, bias=False)  # [k; v], used at encode time
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, layer: int) -> torch.Tensor:
        q = self.q(h).view(-1, self.num_heads, self.head_dim)
        return self.o(cross_attention(q, meta.cross, layer, scale=1.0).reshape(-1, self.inner))


class T5Block(nn.Module):
    # Norms on torch's ops, not miaotui's CPU kernel (as accurate, rounded differently in the last
    # bit): T5's parity with transformers is held to 1e-4 on a tiny model whose sharpened
    # attention magnifies last-bit differences about a thousandfold, and T5 never runs from
    # quantized weights, the CPU case that kernel is for.
    def __init__(self, cfg: Any, paged: PagedAttention | None = None) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(cfg.d_model, eps, cpu_kernel=False)
        self.self_attn = T5SelfAttention(cfg, paged)
        if paged is not None:  # a decoder block
            self.cross_norm = RMSNorm(cfg.d_model, eps, cpu_kernel=False)
            self.cross_attn = T5CrossAttention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, eps, cpu_kernel=False)
        self.ff = T5FeedForward(cfg)


class T5Stack(nn.Module):
    def __init__(self, cfg: Any, num_layers: int, decoder: bool) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                                  bidirectional=not decoder)
        blocks = []
        for _ in range(num_layers):
            paged = None
            if decoder:
                paged = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.d_kv, scale=1.0,
                                       score_bias=self.relative_bias.forward)
            blocks.append(T5Block(cfg, paged))
        self.block = nn.ModuleList(blocks)
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, cpu_kernel=False)


# Hugging Face T5 names (after the stack prefix) -> ours; FF sits in layer 1 (encoder) or 2 (decoder).
_SELF = {"q": 0, "k": 1, "v": 2}
_NAME = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)")


class T5ForConditionalGeneration(CausalLMHead, nn.Module):
    is_encoder_decoder = True
    tie_word_embeddings = False  # lm_head always exists; with a tied checkpoint it shares `shared`

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        act = getattr(cfg, "dense_act_fn", None)
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"T5 feed-forward activation {act!r} is not supported; "
                                        f"supported: {', '.join(sorted(ACTIVATIONS))}")
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = T5Stack(cfg, cfg.num_decoder_layers or cfg.num_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # v1.0 (tied head) scales the decoder output; v1.1 (own head) does not. transformers >= 5
        # records this as `scale_decoder_outputs`; older versions read it from tie_word_embeddings.
        scale = getattr(cfg, "scale_decoder_outputs", None)
        if scale is None:
            scale = getattr(cfg, "tie_word_embeddings", True)
        self.output_scale = cfg.d_model**-0.5 if scale else None

    def input_embeddings(self) -> nn.Embedding:
        return self.shared

    def attention_layers(self) -> list[PagedAttention]:
        return [block.self_attn.paged for block in self.decoder.block]

    def decoder_start_token_id(self) -> int:
        start = getattr(self.config, "decoder_start_token_id", None)
        return start if start is not None else (self.config.pad_token_id or 0)

    @torch.inference_mode()
    def encode(self, states: list[EncoderState]) -> int:
        """Run the encoder on the requests' inputs (one padded batch) and set each state's
        per-layer cross-attention K/V. Returns the number of encoder tokens processed."""
        dev = self.shared.weight.device
        lengths = [s.num_tokens for s in states]
        longest = max(lengths)
        ids = torch.zeros(len(states), longest, dtype=torch.int64, device=dev)
        for i, state in enumerate(states):
            ids[i, : lengths[i]] = torch.tensor(state.token_ids, dtype=torch.int64, device=dev)
        valid = torch.arange(longest, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
        h = self.shared(ids)
        pos = torch.arange(longest, device=dev)
        bias = self.encoder.relative_bias(pos[:, None], pos).to(h.dtype)  # [H, S, S]
        mask = bias[None].masked_fill(~valid[:, None, None, :], float("-inf"))  # padding keys hidden
        for block in self.encoder.block:
            h = h + block.self_attn.encode(block.self_attn_norm(h), mask)
            h = h + block.ff(block.ff_norm(h))
        h = self.encoder.final_layer_norm(h)
        per_layer = []
        for block in self.decoder.block:
            cross = block.cross_attn
            k, v = cross.kv(h).view(len(states), longest, 2, cross.num_heads, cross.head_dim).unbind(2)
            per_layer.append((k, v))
        for i, state in enumerate(states):
            n = lengths[i]
            state.cross_kv = [(k[i, :n].contiguous(), v[i, :n].contiguous()) for k, v in per_layer]
        return sum(lengths)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """The decoder over a flat batch; `positions` are implicit in the paged metadata."""
        if meta.cross is None:
            raise RuntimeError("T5 decoder step without encoder K/V; the runner encodes before the step")
        h = self.shared(input_ids)
        for layer, block in enumerate(self.decoder.block):
            h = h + block.self_attn(block.self_attn_norm(h), meta)
            h = h + block.cross_attn(block.cross_norm(h), meta, layer)
            h = h + block.ff(block.ff_norm(h))
        return self.decoder.final_layer_norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return super().compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], sink: WeightSink) -> None:
        """Hugging Face T5 names; a checkpoint without `lm_head.weight` has its head tied."""
        inner = self.config.num_heads * self.config.d_kv
        d_ff = self.config.d_ff
        for name, tensor in weights:
            if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                continue  # tied to `shared`
            m = _NAME.fullmatch(name)
            if m is None:  # shared.weight, lm_head.weight, {encoder,decoder}.final_layer_norm.weight
                sink.assign(name, tensor, name)
                continue
            stack, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            prefix = f"{stack}.block.{block}."
            ff_layer = 1 if stack == "encoder" else 2
            if sub == 0 and rest.startswith("SelfAttention."):
                proj = rest.split(".")[1]
                if proj == "relative_attention_bias":
                    sink.assign(f"{stack}.relative_bias.embedding.weight", tensor, name)
                elif proj == "o":
                    sink.assign(prefix + "self_attn.o.weight", tensor, name)
                else:
                    sink.copy_shard(prefix + "self_attn.qkv.weight", tensor, _SELF[proj] * inner, proj,
                                    tuple(_SELF), name)
            elif sub == 0:
                sink.assign(prefix + "self_attn_norm.weight", tensor, name)
            elif sub == 1 and stack == "decoder" and rest.startswith("EncDecAttention."):
                proj = rest.split(".")[1]
                if proj == "relative_attention_bias":
                    continue  # present in some checkpoints, never used by cross-attention
                if proj in ("q", "o"):
                    sink.assign(prefix + f"cross_attn.{proj}.weight", tensor, name)
                else:
                    sink.copy_shard(prefix + "cross_attn.kv.weight", tensor, 0 if proj == "k" else inner, proj,
                                    ("k", "v"), name)
            elif sub == 1 and stack == "decoder":
                sink.assign(prefix + "cross_norm.weight", tensor, name)
            elif sub == ff_layer and rest == "layer_norm.weight":
                sink.assign(prefix + "ff_norm.weight", tensor, name)
            elif sub == ff_layer and rest in ("DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight"):
                shard = rest.split(".")[1]
                sink.copy_shard(prefix + "ff.wi.weight", tensor, 0 if shard == "wi_0" else d_ff, shard,
                                ("wi_0", "wi_1"), name)
            elif sub == ff_layer and rest in ("DenseReluDense.wi.weight", "DenseReluDense.wo.weight"):
                sink.assign(prefix + "ff." + rest.split(".")[1] + ".weight", tensor, name)
            else:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in a T5 model")
        if "lm_head.weight" not in sink.loaded and "shared.weight" in sink.loaded:
            # A tied checkpoint: the head is the embedding table itself (same storage).
            sink.assign("lm_head.weight", self.shared.weight.data, "shared.weight (tied head)")
