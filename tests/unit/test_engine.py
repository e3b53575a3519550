"""Engine behaviour through the LLM API on a tiny random model (the embedded tokenizer decodes)."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("engine"), "llama")
    return LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256,
               max_num_batched_tokens=32)


def _prompt(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(20, 256, (n,), generator=g).tolist()}


def test_same_seed_same_text_and_different_seed_differs(llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    a = llm.generate(_prompt(10), p, use_tqdm=False)[0].outputs[0]
    b = llm.generate(_prompt(10), p, use_tqdm=False)[0].outputs[0]
    c = llm.generate(_prompt(10), SamplingParams(temperature=1.0, seed=8, max_tokens=24, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_seeded_output_does_not_depend_on_the_batch(llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)
    alone = llm.generate(_prompt(12, 1), p, use_tqdm=False)[0].outputs[0].token_ids
    others = [_prompt(n, 10 + n) for n in (3, 40, 7)]
    batch = llm.generate([others[0], _prompt(12, 1), *others[1:]],
                         [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), p,
                          SamplingParams(temperature=0, max_tokens=5), SamplingParams(max_tokens=9)],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    top1 = llm.generate(_prompt(9), SamplingParams(temperature=1.3, top_k=1, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert top1 == greedy


def test_n_completions_are_distinct_and_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    out = llm.generate(_prompt(8), p, use_tqdm=False)[0]
    again = llm.generate(_prompt(8), p, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    ids = [o.token_ids for o in out.outputs]
    assert len({tuple(i) for i in ids}) == 3
    assert ids == [o.token_ids for o in again.outputs]
    assert all(len(i) == 12 and o.finish_reason == "length" for i, o in zip(ids, out.outputs))


def test_stop_token_ids_end_the_completion(llm):
    greedy = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop_at = greedy[5]
    out = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    first = greedy.index(stop_at)
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_eos_stops_unless_ignored(llm):
    tok = llm.get_tokenizer()
    greedy = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    eos = greedy[3]
    llm.engine.eos_token_ids = frozenset({eos})
    try:
        out = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        kept = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.engine.eos_token_ids = frozenset({tok.eos_token_id})
    assert out[0].outputs[0].token_ids == greedy[: greedy.index(eos) + 1]
    assert out[0].outputs[0].finish_reason == "stop"
    assert kept[0].outputs[0].token_ids == greedy


def test_stop_string_is_cut_from_the_text(llm):
    full = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    assert len(full) > 12
    stop = full[6:9]
    out = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_logprobs_are_the_raw_model_distribution(llm):
    out = llm.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        ranked = sorted((lp.rank, tid) for tid, lp in entry.items() if lp.rank is not None)
        assert [r for r, _ in ranked] == [1, 2, 3]
        assert ranked[0][1] == token  # greedy picks the rank-1 token
        values = [entry[tid].logprob for _, tid in ranked]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_many_requests_with_small_budget_finish_and_free_every_block(llm):
    engine = llm.engine
    free_before = engine.kv.num_free_blocks
    prompts = [_prompt(n, n) for n in (1, 5, 33, 70, 2, 18)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [10] * 6
    for p, o in zip(prompts, outs):  # chunked prefill and batching do not change greedy output
        alone = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == o.outputs[0].token_ids
    assert engine.kv.num_free_blocks == free_before


def test_abort_frees_blocks(llm):
    engine = llm.engine
    free_before = engine.kv.num_free_blocks
    rid = engine.add_request("abort-me", _prompt(30)["prompt_token_ids"],
                             SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.num_free_blocks < free_before
    engine.abort_request(rid)
    assert engine.kv.num_free_blocks == free_before
    assert not engine.has_unfinished_requests()


def test_preemption_recomputes_and_keeps_outputs(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    small = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=12, max_model_len=40)
    prompts = [_prompt(10, s) for s in range(4)]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0  # 4 x 30 tokens need 32 blocks; 12 exist
    for p, o in zip(prompts, outs):
        alone = small.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
        assert o.outputs[0].token_ids == alone
    assert small.engine.kv.num_free_blocks == 12
