"""Command-line flags that describe a model and its KV cache, and the configs they build.

Both `miaotui generate|chat` (cli.py) and `miaotui serve` (server/serve.py) take them, so they
live here, beneath both (DESIGN.md: Layering), not in either front end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from miaotui.config import KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS, CacheConfig, ModelConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's own")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: prompts must be token ids, outputs carry token ids and no text, "
                        "no stop strings or chat templates (models without tokenizer files, benchmarks)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache size in GiB (default: a share of free memory)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache dtype (CPU): float16 halves an fp32 model's cache, K/V rounded to fp16 "
                        "when written, attention still in fp32; auto (default): float16 with int4/int8 "
                        "weights, else the model's dtype (float32: the reference's exact numbers)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="weight-only quantization (CPU): int4 (groups of 32) or int8 per channel, "
                        "activations meeting the weights in bf16; none: dense --dtype weights (the "
                        "reference); auto (default): a quantized GGUF stays quantized (its 4-bit "
                        "blocks kept as they are), anything else loads dense")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's kernels (default: the physical cores)")
    p.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step (regional: one graph for every layer): no Python "
                        "overhead per token, after a compile of ~20-35 s the first time (~7 s once cached on "
                        "disk); off by default")
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="dummy: random weights for --model given as a config (smollm2-135m, llama-3.2-1b, "
                        "llama-3.1-8b, qwen2.5-0.5b, a config.json or its folder), to measure speed")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (gloo on CPU, NCCL on GPUs); Llama family")


def model_and_cache_configs(args: argparse.Namespace) -> tuple[ModelConfig, CacheConfig]:
    """The configs `add_model_args` flags describe (validated here, before anything loads)."""
    return (ModelConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                        max_model_len=args.max_model_len, quantization=args.quantization,
                        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
                        threads=args.threads, compile_decode=args.compile_decode,
                        skip_tokenizer_init=args.skip_tokenizer_init),
            CacheConfig(kv_cache_memory_gib=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype))


def add_chat_template_arg(p: argparse.ArgumentParser, used_for: str) -> None:
    """--chat-template, read by `load_chat_template`; `used_for` ends its help."""
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help=f"a Jinja chat template (a file, or the template itself) {used_for}")


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding a Jinja template, or the template itself (as vLLM takes
    it). Anything else is an error that names the path, before the model loads."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template "
                         "(give a template file, or the template text itself)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"chat_template: cannot read {value}: {exc}") from exc
