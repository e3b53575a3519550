"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM, run by the Llama family) against transformers on
tiny random checkpoints (fp32, CPU): logits within 1e-4 at prefill and over 16 decode steps, greedy
ids for 32 tokens, a mixed batch equal to each prompt alone; plain RoPE, partial rotary (0.75, as
Phi-4-mini), longrope with its short factors (context window = the original length, sequences below
it) and with its long factors (window 256 > original 16, every sequence past 16 tokens, where
transformers switches to the long factors too: layers/rotary.py `uses_long_factors`). The CPU
decode stack serves plain Phi-3 and declines partial rotary; malformed longrope configs fail fast.
"""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.errors import UnsupportedModelError
from miaotui.kernels.cpu_build import cpu_kernels_available
from miaotui.layers.rotary import uses_long_factors
from miaotui.loader import load_model, resolve_model
from miaotui.models.registry import model_class
from miaotui.request import Request
from miaotui.runner.model_runner import ModelRunner
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from tests.model_checks import assert_decode_stack_matches_layers, hf_greedy_ids

ATOL = 1e-4
TINY_PHI3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _longrope(half: int, original: int, **extra) -> dict:
    # Distinct short and long lists, so picking the wrong set shows in the logits.
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.5 + 0.7 * i for i in range(half)], **extra}


# name -> (Phi3Config overrides, prompt lengths for the mixed batch and for the greedy run)
VARIANTS = {
    "plain": ({}, (13, 30, 9), (5, 17)),
    "partial-0.75-tied": ({"partial_rotary_factor": 0.75, "tie_word_embeddings": True}, (13, 30, 9), (5, 17)),
    "longrope-short": ({"original_max_position_embeddings": 256,
                        "rope_parameters": _longrope(8, 256, attention_factor=1.2)}, (13, 30, 9), (5, 17)),
    "longrope-short-partial": ({"partial_rotary_factor": 0.75, "original_max_position_embeddings": 256,
                                "rope_parameters": _longrope(6, 256, partial_rotary_factor=0.75)},
                               (13, 30, 9), (5, 17)),
    # Window 256 / original 16: attention scaled by sqrt(1 + ln 16 / ln 16); prompts all past 16.
    "longrope-long": ({"original_max_position_embeddings": 16, "rope_parameters": _longrope(8, 16)},
                      (19, 30, 17), (17, 23)),
}


def _checkpoint(folder, overrides):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(**{**TINY_PHI3, **overrides}, architectures=["Phi3ForCausalLM"])
    model = Phi3ForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    overrides, mixed, greedy = VARIANTS[request.param]
    folder, hf_model = _checkpoint(tmp_path_factory.mktemp(request.param), overrides)
    return folder, hf_model, mixed, greedy


def _runner(folder):
    config = ModelConfig(model=str(folder))
    model, _ = load_model(resolve_model(str(folder)), config)
    return ModelRunner(model, config, CacheConfig(block_size=4, num_blocks=64), 256), KVCacheManager(64, 4)


def test_rotary_matches_the_config(variant):
    folder, hf_model, _, _ = variant
    runner, _ = _runner(folder)
    model = runner.model
    ref = hf_model.model.rotary_emb
    attn = model.model.layers[0].self_attn
    assert attn.rotary_dim == 2 * ref.inv_freq.numel()
    assert model.rotary.scaling == pytest.approx(ref.attention_scaling)
    if uses_long_factors(hf_model.config):  # transformers' long table, built on its first long call
        hf_model(torch.zeros(1, 17, dtype=torch.long))
    assert torch.allclose(model.rotary.inv_freq, ref.inv_freq, rtol=1e-6, atol=0)


def test_logits_match_at_prefill_and_16_decode_steps(variant):
    folder, hf_model, _, _ = variant
    runner, kv = _runner(folder)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (21,)).tolist()
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), 256, "r")
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), use_cache=True)
    for step in range(17):  # the prefill, then 16 decode steps
        start = req.num_computed_tokens
        n = req.num_tokens - start
        assert kv.allocate_slots(req, n)
        ours = runner.forward_logits(SchedulerOutput([ScheduledSeq(req, start, n)]))[0]
        diff = (ours - ref.logits[0, -1]).abs().max().item()
        assert diff <= ATOL, f"step {step}: logits differ by {diff}"
        req.num_computed_tokens += n
        token = int(ref.logits[0, -1].argmax())
        req.append_output_token(token)
        with torch.no_grad():
            ref = hf_model(torch.tensor([[token]]), past_key_values=ref.past_key_values, use_cache=True)


def test_batched_mixed_prefill_and_decode_match_transformers(variant):
    """One full prefill, one chunk after a cached prefix, one decode in a flat batch; each row
    equals transformers on that sequence alone."""
    folder, hf_model, lengths, _ = variant
    runner, kv = _runner(folder)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    reqs = [Request(str(i), p, SamplingParams(temperature=0), frozenset(), 256, str(i))
            for i, p in enumerate(prompts)]
    cached, last = lengths[1] - 13, lengths[2] - 1
    warm = [ScheduledSeq(reqs[1], 0, cached), ScheduledSeq(reqs[2], 0, last)]
    for s in warm:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
    runner.forward_logits(SchedulerOutput(warm))
    reqs[1].num_computed_tokens, reqs[2].num_computed_tokens = cached, last
    step = [ScheduledSeq(reqs[0], 0, lengths[0]), ScheduledSeq(reqs[1], cached, 13), ScheduledSeq(reqs[2], last, 1)]
    for s in step:
        assert kv.allocate_slots(s.request, s.num_new_tokens)
    ours = runner.forward_logits(SchedulerOutput(step))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0, -1]
        assert (ours[i] - ref).abs().max().item() <= ATOL


def test_greedy_ids_match_transformers_for_32_tokens(variant, embedded_gguf):
    folder, hf_model, _, lengths = variant
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128,
              max_num_batched_tokens=64, max_model_len=256)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf_model.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy_ids(hf_model, prompt, 32)


@pytest.mark.skipif(not cpu_kernels_available(), reason="miaotui's CPU kernels do not build here")
@pytest.mark.parametrize("overrides,served", [({}, True), ({"partial_rotary_factor": 0.75}, False)])
def test_decode_stack_serves_full_rotary_and_declines_partial(tmp_path, embedded_gguf, overrides, served):
    folder, _ = _checkpoint(tmp_path, overrides)
    assert_decode_stack_matches_layers(folder, embedded_gguf, served)


def test_malformed_longrope_fails_fast():
    from transformers import Phi3Config

    cfg = Phi3Config(**TINY_PHI3, original_max_position_embeddings=16, rope_parameters=_longrope(8, 16),
                     architectures=["Phi3ForCausalLM"])
    cfg.rope_parameters["short_factor"] = [1.0] * 5  # head_dim 16 rotates 8 pairs
    with pytest.raises(UnsupportedModelError, match=r"longrope short_factor must be a list of 8 numbers"):
        model_class(cfg).check_config(cfg)
    # A Llama config carries no original_max_position_embeddings of its own to fall back on.
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY_PHI3, architectures=["LlamaForCausalLM"])
    cfg.rope_parameters = {k: v for k, v in _longrope(8, 16).items() if k != "original_max_position_embeddings"}
    with pytest.raises(UnsupportedModelError, match="needs original_max_position_embeddings"):
        model_class(cfg).check_config(cfg)
