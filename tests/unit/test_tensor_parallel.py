"""Tensor parallelism 2 on gloo over loopback, tiny models: the same numbers as one process, and
a dead worker stops the engine at once instead of hanging it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.errors import UnsupportedModelError
from tests.conftest import make_tiny_checkpoint

PROMPTS = [[5, 9, 200], list(range(3, 20)), list(range(40, 81)), [7] * 9]


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),                                             # GQA: 4 query heads, 2 KV heads -> 2 + 1 per rank
    ("qwen2", {"tie_word_embeddings": False, "vocab_size": 251}),  # QKV bias, own head, vocab not divisible by 2
    ("gemma2", {}),  # (1 + w) norms, soft-capped attention and logits, local and global layers
])
def test_tp2_matches_one_process(arch, overrides, tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / arch, arch, **overrides)
    kwargs = dict(tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    prompts = [{"prompt_token_ids": [t % overrides.get("vocab_size", 256) for t in p]} for p in PROMPTS]
    single = LLM(str(folder), **kwargs).generate(prompts, params, use_tqdm=False)
    tp = LLM(str(folder), tensor_parallel_size=2, **kwargs)
    try:
        assert len(tp.engine.runner.workers) == 1 and tp.engine.runner.workers[0].is_alive()
        attn = tp.engine.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # this rank holds half the heads
        assert attn.o_proj.group is not None  # collectives run on the step group (its own timeout)
        # Gemma 2's local layers get their own KV group on every rank (tables sent in the step diffs).
        assert bool(tp.engine.kv.windows) == (arch == "gemma2")
        sharded = tp.generate(prompts, params, use_tqdm=False)
        sampled = tp.generate(prompts[0], SamplingParams(temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)
    finally:
        tp.shutdown()
    for a, b in zip(single, sharded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # greedy ids identical
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lp_a.keys() == lp_b.keys()  # the same top-5 tokens at every step
            for token, entry in lp_a.items():
                assert abs(entry.logprob - lp_b[token].logprob) < 1e-5  # fp32 rounding only
    assert len(sampled[0].outputs[0].token_ids) == 8


def test_dead_worker_fails_the_engine_fast(tmp_path, embedded_gguf):
    from miaotui.engine.async_engine import AsyncLLMEngine
    from miaotui.runner.tensor_parallel import WorkerFailedError

    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128, tensor_parallel_size=2)
    dead: list[BaseException] = []
    engine = AsyncLLMEngine(llm.engine, on_dead=dead.append)
    worker = llm.engine.runner.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # a bound for a busy machine, not an expected speed
    while not dead and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead and "exited with code -9" in str(dead[0])  # noticed while idle, not at the next request
    assert not engine.is_running
    started = time.monotonic()
    with pytest.raises(WorkerFailedError):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4), use_tqdm=False)
    # At once, not after the 300 s collective timeout a hang would wait for (the bound is loose
    # for a busy machine; a hang is 300 s).
    assert time.monotonic() - started < 60
    engine.shutdown()


def test_unsupported_models_and_shapes_are_named(tmp_path, embedded_gguf):
    gpt2, _ = make_tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UnsupportedModelError, match="tensor parallelism supports the Llama family"):
        LLM(str(gpt2), tokenizer=embedded_gguf, num_kv_blocks=64, tensor_parallel_size=2)
    odd, _ = make_tiny_checkpoint(tmp_path / "odd", "llama", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) is not divisible by 2"):
        LLM(str(odd), tokenizer=embedded_gguf, num_kv_blocks=64, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(odd), tokenizer=embedded_gguf, num_kv_blocks=64, tensor_parallel_size=0)
    assert torch.distributed.is_available()


def test_idle_longer_than_the_collective_timeout_is_fine(tmp_path, embedded_gguf, monkeypatch):
    """Step messages travel by pipe: an engine idle for longer than the collective timeout still
    runs its next step (the timeout bounds only work inside a step)."""
    # Short, but not so short that a rank descheduled on a busy machine trips it in a step.
    monkeypatch.setenv("MIAOTUI_TP_TIMEOUT_S", "6")
    folder, _ = make_tiny_checkpoint(tmp_path / "llama", "llama")
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=128, tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        first = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)
        time.sleep(8)  # idle past the timeout
        again = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)
        assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    assert not llm.engine.runner.workers[0].is_alive()  # shut down cleanly
