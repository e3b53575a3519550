"""Prefix caching through the engine: shared prefixes are computed once, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llms(tmp_path_factory, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("prefix"), "llama")
    kwargs = dict(tokenizer=embedded_gguf, block_size=16, num_kv_blocks=128, max_num_batched_tokens=512)
    return LLM(str(folder), **kwargs), LLM(str(folder), enable_prefix_caching=False, **kwargs)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                    SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=16, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_second_request_computes_only_new_tokens(llms, params):
    cached, cold = llms
    g = torch.Generator().manual_seed(hash(params.greedy) % 1000)
    prefix = torch.randint(20, 256, (208,), generator=g).tolist()  # 13 full blocks
    first = prefix + [1, 2, 3, 4, 5]
    second = prefix + [9, 8, 7, 6, 5, 4, 3]
    engine = cached.engine
    cached.generate({"prompt_token_ids": first}, params, use_tqdm=False)
    hits, computed = engine.kv.prefix_hit_tokens, engine.prompt_tokens_total
    out = cached.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    assert engine.kv.prefix_hit_tokens - hits == 208
    assert engine.prompt_tokens_total - computed == len(second) - 208  # only the 7 new tokens
    reference = cold.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    assert cold.engine.kv.prefix_hit_tokens == 0
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids


def test_identical_prompt_recomputes_only_its_last_block(llms):
    cached, _ = llms
    engine = cached.engine
    prompt = list(range(30, 94))  # exactly 4 full blocks
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a = cached.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    computed = engine.prompt_tokens_total
    b = cached.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    # Logits of the last token are needed to sample, so its block is computed again.
    assert engine.prompt_tokens_total - computed == 16
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_n_siblings_share_the_prompt(llms):
    """n=4 computes the prompt once (up to its last token), not four times."""
    cached, cold = llms
    engine = cold.engine  # no prefix cache: any saving comes from forking
    prompt = list(range(40, 140))
    before = engine.prompt_tokens_total
    out = cold.generate({"prompt_token_ids": prompt},
                        SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)[0]
    assert engine.prompt_tokens_total - before == 99 + 4  # shared prefix + each sibling's last token
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4


def test_cache_salt_separates_tenants(llms):
    cached, _ = llms
    engine = cached.engine
    prompt = list(range(100, 180))  # 5 full blocks
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def run(rid, salt):
        engine.add_request(rid, prompt, params, cache_salt=salt)
        while engine.has_unfinished_requests():
            engine.step()

    run("tenant-a", "a")
    hits = engine.kv.prefix_hit_tokens
    run("tenant-b", "b")
    assert engine.kv.prefix_hit_tokens == hits  # another salt: nothing shared
    run("tenant-a-again", "a")
    assert engine.kv.prefix_hit_tokens - hits == 64  # same salt: 4 blocks (the last is recomputed)
