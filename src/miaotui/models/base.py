"""What every causal LM of the paged contract shares: mapping hidden states to logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMHead:
    """`compute_logits` for models with `input_embeddings()` and either a tied head or `lm_head`.

    `layers.quantized` may set `quantized_head` (an int8 head for a tied embedding table); it wins.
    Logits are always fp32, whatever the compute dtype."""

    tie_word_embeddings: bool

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        quantized = getattr(self, "quantized_head", None)
        if quantized is not None:
            return quantized(hidden).float()
        if self.tie_word_embeddings:
            return F.linear(hidden, self.input_embeddings().weight).float()
        return self.lm_head(hidden).float()
