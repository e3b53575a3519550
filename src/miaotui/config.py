"""Engine configuration: small frozen dataclasses, validated on construction, no I/O.

Environment variables are read here and nowhere else (see `env_default_model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# User-facing dtype names -> torch attribute names. torch is imported only when a config is
# built, so the command line's --help and --version (which import this module) stay fast.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


# Where weights come from: the checkpoint, or random values for a config (loader/dummy.py).
LOAD_FORMATS = ("auto", "dummy")

# Weight-only quantization modes (layers/quantized.py): on torch's low-bit CPU kernels. "auto":
# a quantized GGUF file on the CPU stays quantized (int4 where it has 4-bit blocks, int8 for its
# other quantized matrices); anything else loads dense (see loader.resolve_quantization).
QUANTIZATIONS = ("auto", "none", "int8", "int4")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name to a torch dtype; unknown names raise ValueError."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in {getattr(torch, name) for name in _DTYPES.values()}:
            raise ValueError(f"dtype: {dtype} is not supported; use one of float32, float16, bfloat16")
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise ValueError(
            f"dtype: unknown value {dtype!r}; use one of float32, float16, bfloat16"
        ) from None


def env_default_model() -> str | None:
    """MIAOTUI_MODEL overrides the embedded default model when no --model is given."""
    return os.environ.get("MIAOTUI_MODEL") or None


def cache_dir() -> str:
    """Where derived files (tokenizers converted from GGUF) are kept: MIAOTUI_CACHE_DIR, else
    $XDG_CACHE_HOME/miaotui, else ~/.cache/miaotui."""
    explicit = os.environ.get("MIAOTUI_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "miaotui")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What to load and how. `model=None` means the embedded default model."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: torch.dtype | str = "float32"  # parsed to a torch.dtype on construction
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int | None = None  # draws of unseeded requests; None: fresh randomness per process
    quantization: str = "auto"  # one of QUANTIZATIONS
    tensor_parallel_size: int = 1  # ranks holding a shard each (runner/tensor_parallel.py)
    load_format: str = "auto"  # one of LOAD_FORMATS
    threads: int | None = None  # CPU threads for the kernels; None: the physical cores (runner/threads.py)
    compile_decode: bool = False  # torch.compile the decode step (runner/compiled_decode.py)
    skip_tokenizer_init: bool = False  # no tokenizer: prompts are token ids, outputs have ids and no text

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization not in ("none", "auto") and not str(self.device).startswith("cpu"):
            raise ValueError(f"quantization: {self.quantization} runs on the CPU only, not on {self.device}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: must be an integer >= 1, got {self.threads!r}")
        if self.compile_decode and self.tensor_parallel_size > 1:
            raise ValueError("compile_decode: not supported with tensor_parallel_size > 1 (the ranks' "
                             "collectives run outside the compiled graph); drop one of the two")
        if not isinstance(self.skip_tokenizer_init, bool):
            raise ValueError(f"skip_tokenizer_init: must be true or false, got {self.skip_tokenizer_init!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed: must be an integer or None, got {self.seed!r}")


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache geometry and dtype. `num_blocks=None` sizes the pool from
    `kv_cache_memory_gib`, and that, when None, defaults to a share of the device's free memory
    (see model_runner)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float | None = None
    enable_prefix_caching: bool = True
    # "auto": the model's compute dtype, but fp16 for an fp32 CPU model with low-bit weights
    # (runner/model_runner.py: kv_cache_dtype). float16 / bfloat16 halve an fp32 model's cache
    # (K/V rounded when written, attention still in fp32 on the CPU); the CPU only.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib: must be > 0, got {self.kv_cache_memory_gib}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Per-step limits: how many sequences and how many new tokens one forward pass may hold."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one API request may ask for, checked before it is admitted (each a 400 naming the
    field and the limit): the work a request causes before the engine runs it, and its cost on
    the engine thread every step, stay bounded whatever a client sends."""

    max_prompts: int = 256  # prompts in one completions request
    max_n: int = 16  # samples per prompt
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024  # each stop string
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024  # entries of the logit_bias map
    max_logprobs: int = 20  # logprobs / top_logprobs / prompt_logprobs (the engine's cap is 20)
    max_messages: int = 2048  # messages of one chat request
    max_chat_template_chars: int = 256 * 1024  # a request's own chat_template

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_n", "max_stop_string_chars", "max_messages", "max_chat_template_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_stop_strings", "max_stop_token_ids", "max_logit_bias"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs: must be in [0, 20] (the engine returns at most 20), "
                             f"got {self.max_logprobs}")


# vLLM's names of its reasoning parsers that we implement, and "none" (no split).
REASONING_PARSERS = ("qwen3", "deepseek_r1", "none")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP front end. `max_queued_requests` counts requests waiting beyond the running ones;
    past it the server answers 429. `max_body_bytes` bounds a request body (413 beyond)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 256
    max_body_bytes: int = 4 * 2**20
    graceful_shutdown_s: float = 30.0
    chat_template: str | None = None  # Jinja text for requests that send none (None: the model's)
    # A request's own chat_template is code the server runs: refused (400) unless the operator trusts them.
    trust_request_chat_template: bool = False
    # Limits of every chat template render (server/template_worker.py): seconds, and output characters
    # (None: max(1 MiB, 16 x the context length)).
    chat_template_timeout_s: float = 5.0
    chat_template_max_chars: int | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    # A streaming client that reads nothing for this long is disconnected and its request aborted.
    stream_stall_timeout_s: float = 30.0
    # How chat replies split thinking from the answer (server/parsers/reasoning.py): one of
    # REASONING_PARSERS; None: `qwen3` where the chat template thinks in <think> tags, else none.
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests: must be >= 0, got {self.max_queued_requests}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty")
        if not isinstance(self.trust_request_chat_template, bool):
            raise ValueError(f"trust_request_chat_template: must be true or false, got "
                             f"{self.trust_request_chat_template!r}")
        if not self.chat_template_timeout_s > 0:
            raise ValueError(f"chat_template_timeout_s: must be > 0, got {self.chat_template_timeout_s}")
        if self.chat_template_max_chars is not None and self.chat_template_max_chars < 1:
            raise ValueError(f"chat_template_max_chars: must be >= 1, got {self.chat_template_max_chars}")
        if not self.stream_stall_timeout_s > 0:
            raise ValueError(f"stream_stall_timeout_s: must be > 0, got {self.stream_stall_timeout_s}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser: must be one of {', '.join(REASONING_PARSERS)} (or unset: "
                             f"chosen from the chat template), got {self.reasoning_parser!r}")
