"""Shared fixtures: tiny random checkpoints made on the fly, and the embedded SmolLM2 GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
TINY_GPT2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512)
TINY_BLOOM = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)


def make_tiny_checkpoint(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> tuple[Path, object]:
    """Save a tiny random transformers model of `arch` (llama | mistral | qwen2 | gpt2 | bloom) to `folder`.

    Returns (folder, the transformers model in eval mode, fp32)."""
    from transformers import (BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel),
               "bloom": (BloomConfig, BloomForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    base = {"gpt2": TINY_GPT2, "bloom": TINY_BLOOM}.get(arch, TINY)
    config = config_cls(**{**base, **overrides})
    model = model_cls(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    from miaotui.loader.default_model import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_gguf):
    from miaotui.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf, is_gguf=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, object]:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def engine_llm(tmp_path_factory, embedded_gguf):
    """An LLM on a tiny random Llama (vocab 256) with the embedded tokenizer, small blocks."""
    from miaotui import LLM

    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("engine_llm"), "llama")
    return LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256,
               max_num_batched_tokens=32)


@pytest.fixture(scope="session")
def embedded_llm(embedded_gguf):
    """miaotui on the embedded default model (loaded once per test session)."""
    from miaotui import LLM

    return LLM()


@pytest.fixture(scope="session")
def embedded_hf(embedded_gguf):
    """(tokenizer, model) of transformers loading the same embedded GGUF, fp32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(embedded_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model
