"""Sliding-window KV groups on a tiny random Qwen2 (fp32, CPU) whose layers are sliding (window
8), full, sliding, with 4-token blocks: the sliding layers get a KV group of their own that lets
go of the blocks behind the window, and everything it computes equals transformers (eager
attention, which honours the window) and the engine keeping every block: logits through chunked
prefill and decode far past the window, greedy ids of a batch, prefix-cache reuse against a cold
run, preemption under a tiny budget, n > 1 forks and beam search.
"""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import CacheConfig, ModelConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.loader import load_model, resolve_model
from miaotui.request import Request
from miaotui.runner.kv_layout import max_held_blocks
from miaotui.runner.model_runner import ModelRunner
from miaotui.sampling_params import BeamSearchParams
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from tests.conftest import make_tiny_checkpoint
from tests.model_checks import hf_greedy_ids

WINDOW, BS = 8, 4
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, hf_model = make_tiny_checkpoint(
        tmp_path_factory.mktemp("qwen2-sliding"), "qwen2", num_hidden_layers=3, use_sliding_window=True,
        sliding_window=WINDOW, max_window_layers=0, layer_types=LAYERS, attn_implementation="eager",
        tie_word_embeddings=False)
    hf_model.generation_config.eos_token_id = None
    return folder, hf_model


def _prompt(n: int, seed: int) -> list[int]:
    torch.manual_seed(seed)
    return torch.randint(0, 256, (n,)).tolist()


def _llm(folder, tokenizer, **kw) -> LLM:
    kw = {"block_size": BS, "num_kv_blocks": 128, "max_num_batched_tokens": 16, "max_model_len": 256, **kw}
    return LLM(str(folder), tokenizer=tokenizer, **kw)


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_transformers_reference_honours_the_window(checkpoint):
    from transformers import Qwen2ForCausalLM

    folder, hf_model = checkpoint
    full = Qwen2ForCausalLM.from_pretrained(folder, layer_types=["full_attention"] * 3,
                                            attn_implementation="eager").eval()
    ids = torch.tensor([_prompt(40, 0)])
    with torch.no_grad():
        assert (hf_model(ids).logits[0, -1] - full(ids).logits[0, -1]).abs().max() > 1e-2


def _runner(folder, groups: bool) -> tuple[ModelRunner, KVCacheManager]:
    config = ModelConfig(model=str(folder))
    model, _ = load_model(resolve_model(str(folder)), config)
    runner_cls = ModelRunner if groups else type("OneGroupRunner", (ModelRunner,), {"supports_window_groups": False})
    runner = runner_cls(model, config, CacheConfig(block_size=BS, num_blocks=96), 256, max_num_batched_tokens=8)
    return runner, KVCacheManager(runner.num_blocks, BS, windows=runner.kv_windows)


def test_logits_match_transformers_and_all_blocks_kept_through_chunks_and_decode(checkpoint):
    """A 41-token prompt in 8-token chunks, then 40 decode steps (to 81 tokens, 10 windows): the
    logits equal transformers' within 1e-4 and the one-group runner's bit for bit, while the
    sliding group holds at most max_held_blocks blocks and the full group all of them."""
    folder, hf_model = checkpoint
    grouped, kv = _runner(folder, groups=True)
    single, kv_single = _runner(folder, groups=False)
    assert kv.windows and kv.windows[0].window == WINDOW and not kv_single.windows
    ids = _prompt(41, 1)
    req = Request("r", ids, SamplingParams(temperature=0), frozenset(), 256, "r")
    twin = Request("r", ids, SamplingParams(temperature=0), frozenset(), 256, "r")
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), use_cache=True)
    past, ref_logits = ref.past_key_values, ref.logits[0, -1]
    bound = max_held_blocks(WINDOW, 8, BS)
    held = []
    while req.num_tokens < 81:
        start = req.num_computed_tokens
        n = min(8, req.num_tokens - start)
        assert kv.allocate_slots(req, n) and kv_single.allocate_slots(twin, n)
        held.append(kv.window_held_blocks(req)[0])
        ours = grouped.forward_logits(SchedulerOutput([ScheduledSeq(req, start, n)]))
        theirs = single.forward_logits(SchedulerOutput([ScheduledSeq(twin, start, n)]))
        req.num_computed_tokens += n
        twin.num_computed_tokens += n
        if ours is None or req.num_computed_tokens < req.num_tokens:
            continue  # a prompt chunk before the last: nothing sampled
        assert torch.equal(ours, theirs)
        diff = (ours[0] - ref_logits).abs().max().item()
        assert diff <= ATOL, f"at {req.num_tokens} tokens: logits differ by {diff}"
        token = int(ref_logits.argmax())
        req.append_output_token(token)
        twin.append_output_token(token)
        with torch.no_grad():
            ref = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, ref_logits = ref.past_key_values, ref.logits[0, -1]
    assert max(held) <= bound and held[-1] <= -(-WINDOW // BS) + 1
    assert len(req.block_ids) == len(twin.block_ids) == -(-80 // BS)
    assert req.window_block_ids[0].count(0) >= len(req.block_ids) - bound  # placeholders behind the window


def test_greedy_ids_of_a_chunked_batch_match_transformers(checkpoint, embedded_gguf):
    folder, hf_model = checkpoint
    llm = _llm(folder, embedded_gguf)
    assert llm.engine.kv.windows, "the sliding layers should have their own KV group"
    prompts = [_prompt(n, 3 + n) for n in (41, 23, 5, 60)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, ids in zip(prompts, _ids(llm, prompts, params)):
        assert ids[0] == hf_greedy_ids(hf_model, prompt, 40)


def test_prefix_cache_reuse_equals_a_cold_run(checkpoint, embedded_gguf):
    """A prompt of 45 tokens (over 5 windows), the same again, and one sharing its first 37:
    the warm engine takes hits longer than the window and gives the cold engine's ids."""
    folder, _ = checkpoint
    warm = _llm(folder, embedded_gguf, num_kv_blocks=256)
    cold = _llm(folder, embedded_gguf, num_kv_blocks=256, enable_prefix_caching=False)
    a = _prompt(45, 7)
    prompts = [a, a, a[:37] + _prompt(10, 8)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    hits = []
    for p in prompts:
        before = warm.engine.kv.prefix_hit_tokens
        assert _ids(warm, [p], params) == _ids(cold, [p], params)
        hits.append(warm.engine.kv.prefix_hit_tokens - before)
    assert hits[0] == 0 and hits[1] == 44 and hits[2] == 36  # whole blocks, one token left to compute


def test_preemption_under_a_tiny_kv_budget_matches_transformers(checkpoint, embedded_gguf):
    folder, hf_model = checkpoint
    llm = _llm(folder, embedded_gguf, num_kv_blocks=24, max_model_len=128)
    prompts = [_prompt(30, 20 + i) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    outs = _ids(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, ids in zip(prompts, outs):
        assert ids[0] == hf_greedy_ids(hf_model, prompt, 50)


def test_forks_and_beam_search_equal_the_engine_keeping_every_block(checkpoint, embedded_gguf, monkeypatch):
    folder, _ = checkpoint
    prompts = [_prompt(30, 30), _prompt(13, 31)]
    sampled = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    beams = BeamSearchParams(beam_width=3, max_tokens=24)

    def run():
        llm = _llm(folder, embedded_gguf)
        outs = _ids(llm, prompts, sampled)
        beam = [[c.token_ids for c in o.outputs]
                for o in llm.beam_search([{"prompt_token_ids": p} for p in prompts], beams, use_tqdm=False)]
        return llm, outs, beam

    llm, outs, beam = run()
    assert llm.engine.kv.windows
    monkeypatch.setattr(ModelRunner, "supports_window_groups", False)
    llm_single, outs_single, beam_single = run()
    assert not llm_single.engine.kv.windows
    assert outs == outs_single and beam == beam_single
