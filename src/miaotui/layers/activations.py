"""Activation functions by their Hugging Face config names (`ACT2FN` keys)."""

from __future__ import annotations

import torch.nn.functional as F

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
