"""Batch invariance (fp32): 32 requests of mixed lengths and sampling params, submitted at
staggered steps with a small token budget and a small KV pool (forcing chunked prefill and
preemption), each produce exactly the tokens they produce when run alone.

For T5 the prompt goes to the encoder (batched with padding whatever the lengths) and the
paged cache holds only the decoder, whose prompt is one start token: nothing to chunk, and the
pool is made small in 4-token blocks so that decoders are preempted and recomputed."""

from __future__ import annotations

import random

import pytest

from miaotui import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint


def _requests(max_new: int = 24) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(1234)
    lengths = [1, 2, 3, 7, 16, 17, 33, 64, 100, 150, 200, 255, 256, 299, 300] + [rng.randint(1, 300) for _ in range(17)]
    out = []
    for i, n in enumerate(lengths):
        prompt = [rng.randint(3, 255) for _ in range(n)]
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, max_new), ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=rng.randint(1, max_new), ignore_eos=True)
        elif kind == 2:
            params = SamplingParams(temperature=1.2, top_k=20, min_p=0.02, seed=100 + i,
                                    repetition_penalty=1.3, max_tokens=rng.randint(1, max_new), ignore_eos=True)
        else:
            params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
                                    max_tokens=rng.randint(1, max_new), ignore_eos=True)
        out.append((prompt, params))
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2", "bloom", "t5"])
def arch_folder(request, tmp_path_factory):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp(f"invariance-{request.param}"), request.param)
    return request.param, folder


def test_staggered_batch_equals_each_request_alone(arch_folder, embedded_gguf):
    arch, folder = arch_folder
    requests = _requests(64 if arch == "t5" else 24)
    alone_llm = LLM(str(folder), tokenizer=embedded_gguf, enable_prefix_caching=False, num_kv_blocks=128,
                    max_model_len=512)
    alone = [alone_llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in requests]

    if arch == "t5":  # 80 blocks x 4 for 16 decoders of up to 65 tokens (17 blocks) each
        pool = dict(block_size=4, num_kv_blocks=80, max_model_len=320)
    else:  # 40 blocks x 16 = 640 tokens for up to 32 x 324 tokens: preemption is certain.
        pool = dict(num_kv_blocks=40, max_model_len=512)
    busy = LLM(str(folder), tokenizer=embedded_gguf, max_num_batched_tokens=64, max_num_seqs=16, **pool)
    engine = busy.engine
    results: dict[str, list[int]] = {}
    pending = list(enumerate(requests))
    step = 0
    chunked = False
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # four new requests every third step
            for i, (p, sp) in pending[:4]:
                engine.add_request(str(i), p, sp)
            pending = pending[4:]
        outs = engine.step()
        chunked = chunked or any(r.num_computed_tokens < r.num_prompt_tokens
                                 for r in engine.scheduler.running)
        for out in outs:
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert step < 20_000
    assert chunked or arch == "t5", "no prompt was ever split across steps"
    assert engine.scheduler.num_preemptions > 0, "the pool was never short"
    for i, expected in enumerate(alone):
        assert results[str(i)] == expected, f"request {i} (prompt {len(requests[i][0])} tokens) differs"
    assert engine.kv.num_free_blocks == pool["num_kv_blocks"]
