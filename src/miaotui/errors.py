"""Exceptions a user can act on. Each message names the problem and, where possible, the fix.

They subclass the built-in type a caller would naturally catch (ValueError for bad input,
FileNotFoundError for a missing path) so generic handlers keep working.
"""

from __future__ import annotations


class MiaotuiError(Exception):
    """Base class of every error miaotui raises on purpose."""


class ModelNotFoundError(MiaotuiError, FileNotFoundError):
    """The model path does not exist, or the embedded default model is not installed."""


class ModelLoadError(MiaotuiError, ValueError):
    """The model exists but cannot be loaded: no weights, truncated or corrupt file, bad tensor."""


class UnsupportedModelError(MiaotuiError, ValueError):
    """The architecture, GGUF quantization type or RoPE variant is not implemented."""


class PromptTooLongError(MiaotuiError, ValueError):
    """The prompt does not fit into the model's context window."""
