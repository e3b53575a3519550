"""Decoder-only parity with transformers on tiny random checkpoints (fp32, CPU).

Logits match within 1e-4 at prefill and at each of 16 decode steps, and greedy ids match for
32 tokens, for Llama (plain, tied, llama3 RoPE, biases), Mistral (sliding window), Qwen2, Qwen3
(Q/K norm; head_dim 32 != hidden / heads; with and without biases), SmolLM3 (RoPE-less layers) and
Gemma 2 (soft-capped attention and logits) and Gemma 3 ((1 + w) norms, local and global layers with their
own RoPE, Q/K norm), Mixtral and Qwen3-MoE (top-2 of 8 experts; dense layers between), gpt-oss
(attention sinks, sliding and full layers, YaRN, biased router and clamped-SwiGLU experts), Llama with YaRN, GPT-2 (GELU-tanh; a ReLU variant with attention scaled by the inverse layer index) and BLOOM
(ALiBi; 6 heads exercise the slopes beyond a power of two).
"""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from miaotui.loader import load_model, resolve_model
from miaotui.request import Request
from miaotui.runner.model_runner import ModelRunner
from tests.conftest import make_tiny_checkpoint
from tests.model_checks import hf_greedy_ids

SMOLLM3_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # its defaults lie past vocab 256
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope-bias": ("llama", {
        "attention_bias": True, "mlp_bias": True, "head_dim": 32,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }),
    "llama-linear-rope-mha": ("llama", {"num_key_value_heads": 4,
                                        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": False}),
    "qwen3-bias-tied": ("qwen3", {"head_dim": 32, "attention_bias": True, "tie_word_embeddings": True}),
    # Layers 1 and 3 (every 2nd) skip RoPE; layer 2 too, by an explicit per-layer list.
    "smollm3-interval": ("smollm3", {"num_hidden_layers": 4, "no_rope_layer_interval": 2, **SMOLLM3_IDS}),
    "smollm3-list": ("smollm3", {"num_hidden_layers": 3, "no_rope_layers": [1, 0, 0], **SMOLLM3_IDS}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "gemma3-window-16-mha": ("gemma3", {"sliding_window": 16, "num_key_value_heads": 4}),
    # Mixture-of-experts: 8 experts, top-2 (Mixtral renormalises; Qwen3-MoE as its config says,
    # and with decoder_sparse_step 2 its odd layers are dense).
    "mixtral": ("mixtral", {}),
    "qwen3-moe": ("qwen3_moe", {}),
    "qwen3-moe-sparse-step-unnormalised": ("qwen3_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2,
                                                         "norm_topk_prob": False}),
    # gpt-oss: attention sinks, biased attention, sliding (window 8 < every prompt here) and full
    # layers, YaRN, a biased top-k-then-softmax router, biased clamped-SwiGLU experts. The second:
    # MHA, a 5-token window, full layers first, 3 experts of 6 and YaRN with its ends truncated.
    "gpt-oss": ("gpt_oss", {}),
    "gpt-oss-mha-window-5-top-3": ("gpt_oss", {
        "num_key_value_heads": 4, "sliding_window": 5, "num_local_experts": 6, "num_experts_per_tok": 3,
        "num_hidden_layers": 3, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                            "original_max_position_embeddings": 32, "truncate": True}}),
    "llama-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 128}}),
    "gpt2": ("gpt2", {}),
    "gpt2-relu-scaled": ("gpt2", {"activation_function": "relu", "scale_attn_by_inverse_layer_idx": True,
                                  "n_inner": 96}),
    "bloom": ("bloom", {}),
    "bloom-6-heads-post-ln-residual": ("bloom", {"n_head": 6, "hidden_size": 96,
                                                  "apply_residual_connection_post_layernorm": True}),
}
PROMPT_LEN = 21
ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    folder, hf_model = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)
    return folder, hf_model


def _runner(folder):
    config = ModelConfig(model=str(folder))
    model, hf_config = load_model(resolve_model(str(folder)), config)
    runner = ModelRunner(model, config, CacheConfig(block_size=4, num_blocks=64), 256)
    return runner, KVCacheManager(64, 4, windows=runner.kv_windows)  # sliding-window layers' own groups


def test_logits_match_at_prefill_and_16_decode_steps(checkpoint):
    folder, hf_model = checkpoint
    runner, kv = _runner(folder)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (PROMPT_LEN,)).tolist()
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), 256, "r")

    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), use_cache=True)
    past = ref.past_key_values
    ref_logits = ref.logits[0, -1]
    for step in range(17):  # the prefill, then 16 decode steps
        start = req.num_computed_tokens
        n = req.num_tokens - start
        assert kv.allocate_slots(req, n)
        ours = runner.forward_logits(SchedulerOutput([ScheduledSeq(req, start, n)]))[0]
        diff = (ours - ref_logits).abs().max().item()
        assert diff <= ATOL, f"step {step}: logits differ by {diff}"
        req.num_computed_tokens += n
        token = int(ref_logits.argmax())
        req.append_output_token(token)
        with torch.no_grad():
            ref = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = ref.past_key_values
        ref_logits = ref.logits[0, -1]


def test_batched_mixed_prefill_and_decode_match_transformers(checkpoint):
    """Three sequences in one flat batch: one full prefill, one chunk after a cached prefix, one
    decode; each row equals transformers on that sequence alone."""
    folder, hf_model = checkpoint
    runner, kv = _runner(folder)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (13, 30, 9)]
    reqs = [Request(str(i), p, SamplingParams(temperature=0), frozenset(), 256, str(i))
            for i, p in enumerate(prompts)]
    # Warm-up step: request 1 gets its first 17 tokens cached, request 2 its whole prompt but one.
    warm = [ScheduledSeq(reqs[1], 0, 17), ScheduledSeq(reqs[2], 0, 8)]
    for s in warm:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
    runner.forward_logits(SchedulerOutput(warm))
    reqs[1].num_computed_tokens, reqs[2].num_computed_tokens = 17, 8
    step = [ScheduledSeq(reqs[0], 0, 13), ScheduledSeq(reqs[1], 17, 13), ScheduledSeq(reqs[2], 8, 1)]
    for s in step:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
    ours = runner.forward_logits(SchedulerOutput(step))
    assert ours.shape[0] == 3
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0, -1]
        assert (ours[i] - ref).abs().max().item() <= ATOL


def test_greedy_ids_match_transformers_for_32_tokens(checkpoint, embedded_gguf):
    folder, hf_model = checkpoint
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128,
              max_num_batched_tokens=64, max_model_len=256)  # BLOOM (ALiBi) has no position limit
    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 17)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf_model.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy_ids(hf_model, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
