"""Shared fixtures: tiny random checkpoints made on the fly, and the embedded SmolLM2 GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels are tested in triton's interpreter, which must be chosen before
# anything imports triton (importing transformers does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# Gemma: 4 layers, local (window 8) and global; head_dim 16 != hidden / heads; query_pre_attn_scalar
# 24 != head_dim, so the attention scale is Gemma's own. Gemma 2 soft-caps attention and logits.
_GEMMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
              query_pre_attn_scalar=24, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
TINY_GEMMA2 = dict(_GEMMA, attn_logit_softcapping=0.05, final_logit_softcapping=1.5)
TINY_GEMMA3 = dict(_GEMMA, rope_parameters={
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})
# Mixture-of-experts: 8 experts, 2 per token; Qwen3-MoE's dense layers keep intermediate_size.
TINY_MIXTRAL = dict(TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
TINY_QWEN3_MOE = dict(TINY, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True)
# gpt-oss: 4 layers alternating sliding (window 8) and full, head_dim 16, 8 experts top-2, YaRN
# (factor 4 over an original 64 positions, truncate off as the real config), a SwiGLU clamp low
# enough (0.5) that random projections hit it.
TINY_GPT_OSS = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                    num_local_experts=8, num_experts_per_tok=2, swiglu_limit=0.5,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
TINY_GPT2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512)
TINY_BLOOM = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)
# d_kv * num_heads (32) != d_model (64): the attention inner width differs from the model width.
TINY_T5 = dict(vocab_size=256, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=4,
               decoder_start_token_id=0, initializer_factor=1.5)


def _sharpen_t5(model) -> None:
    """Random T5 weights at the default scale make greedy decoding repeat one token forever
    (the decoder barely sees its own past). A strong decoder position bias and self-attention
    value projection make the outputs vary with position, so greedy tests exercise it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder.") and "relative_attention_bias" in name:
                param.mul_(20.0)
            elif name.startswith("decoder.") and "SelfAttention.v." in name:
                param.mul_(3.0)


def _untie_t5_head(model, folder: Path) -> None:
    """The layout of real T5 v1.1 / flan checkpoints: a separate `lm_head.weight` in the file.
    transformers >= 5 always saves T5 tied, so the head is added to the file by hand and the
    reference model is given the same separate head."""
    from safetensors.torch import load_file, save_file

    head = torch.randn(model.config.vocab_size, model.config.d_model) * model.config.d_model**-0.5
    model.lm_head.weight = torch.nn.Parameter(head)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = head.clone()
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_tiny_checkpoint(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> tuple[Path, object]:
    """Save a tiny random transformers model of `arch` (llama | mistral | qwen2 | qwen3 | smollm3 |
    gemma2 | gemma3 | mixtral | qwen3_moe | gpt_oss | gpt2 | bloom | t5) to `folder`. MoE routers are scaled
    up (random ones at init give near-uniform routes, where any rounding could pick other experts).
    gpt-oss's sinks and biases (small or zero at init) are made random, so each is exercised. Gemma's norm weights (zero at init: a factor
    of 1 + w = 1) are made random, so the (1 + w) offset is exercised. For t5, `untied_head=True` writes a separate head as real v1.1 files have.

    Returns (folder, the transformers model in eval mode, fp32)."""
    from transformers import (BloomConfig, BloomForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                              Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM, SmolLM3Config, SmolLM3ForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "smollm3": (SmolLM3Config, SmolLM3ForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel),
               "bloom": (BloomConfig, BloomForCausalLM), "t5": (T5Config, T5ForConditionalGeneration),
               "gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
               "mixtral": (MixtralConfig, MixtralForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
               "gpt_oss": (GptOssConfig, GptOssForCausalLM)}
    config_cls, model_cls = classes[arch]
    untied_head = overrides.pop("untied_head", False)
    torch.manual_seed(seed)
    base = {"gpt2": TINY_GPT2, "bloom": TINY_BLOOM, "t5": TINY_T5, "gemma2": TINY_GEMMA2,
            "gemma3": TINY_GEMMA3, "mixtral": TINY_MIXTRAL, "qwen3_moe": TINY_QWEN3_MOE,
            "gpt_oss": TINY_GPT_OSS}.get(arch, TINY)
    config = config_cls(**{**base, **overrides})
    if arch.startswith("gemma") or arch == "gpt_oss":
        config._attn_implementation = "eager"  # the reference for soft-capping and sinks (SDPA has neither)
    model = model_cls(config).eval()
    if arch == "t5":
        _sharpen_t5(model)
    if arch.startswith("gemma"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.5)
    if arch in ("mixtral", "qwen3_moe"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.mul_(8.0)
    if arch == "gpt_oss":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("self_attn.sinks"):
                    param.normal_(0.0, 1.0)
                elif name.endswith("mlp.router.weight"):
                    param.mul_(8.0)
                elif name.endswith(("mlp.router.bias", "_proj_bias")):
                    param.normal_(0.0, 0.1)
                elif name.endswith("experts.gate_up_proj"):
                    param.mul_(10.0)  # pre-activations near the clamp, on both of its sides
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if untied_head:
        _untie_t5_head(model, folder)
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

    return LLM(quantization="none")  # the dense fp32 reference path


@pytest.fixture(scope="session")
def embedded_hf(embedded_gguf):
    """(tokenizer, model) of transformers loading the same embedded GGUF, fp32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(embedded_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model
