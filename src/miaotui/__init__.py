"""miaotui (秒推): a fast LLM inference engine and OpenAI-compatible server on PyTorch.

The public names are imported on first use (PEP 562), so `import miaotui` — and with it
`miaotui --help` / `--version` — does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "miaotui.llm",
    "LLMEngine": "miaotui.engine.llm_engine",
    "AsyncLLMEngine": "miaotui.engine.async_engine",
    "SamplingParams": "miaotui.sampling_params",
    "RequestOutputKind": "miaotui.sampling_params",
    "RequestOutput": "miaotui.outputs",
    "CompletionOutput": "miaotui.outputs",
    "Logprob": "miaotui.outputs",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.engine.llm_engine import LLMEngine
    from miaotui.llm import LLM
    from miaotui.outputs import CompletionOutput, Logprob, RequestOutput
    from miaotui.sampling_params import RequestOutputKind, SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'miaotui' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
