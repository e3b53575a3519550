"""miaotui (秒推): a fast LLM inference engine and OpenAI-compatible server on PyTorch."""

from miaotui.engine.llm_engine import LLMEngine
from miaotui.llm import LLM
from miaotui.outputs import CompletionOutput, Logprob, RequestOutput
from miaotui.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]
