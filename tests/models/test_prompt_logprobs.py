"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers on a tiny random Llama (fp32).

At every prompt position the returned logprob of the next prompt token, its rank and the top k
match transformers' log_softmax of its logits within 1e-4: in one chunk, through chunked prefill
(a prompt longer than max_num_batched_tokens, batched with other requests), with n > 1, after
preemption, and for a prompt whose prefix is already cached (which it then does not reuse, while
its own blocks still serve later requests). Requests without prompt logprobs compute no extra
logits, and the tensor-parallel step diff carries the scoring rows.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.request import Request
from miaotui.runner.step_diff import StepDiffDecoder, StepDiffEncoder
from tests.conftest import make_tiny_checkpoint

ATOL = 1e-4
K = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prompt_logprobs"), "llama")


def _llm(folder, tokenizer, **options) -> LLM:
    kwargs = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=32, quantization="none")
    return LLM(str(folder), tokenizer=tokenizer, **(kwargs | options))


def _prompt(seed: int, n: int) -> list[int]:
    return [(7 * seed + 13 * j + j * j) % 250 + 3 for j in range(n)]


def _reference(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check(prompt_logprobs, ids: list[int], ref: torch.Tensor, k: int = K) -> None:
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for p in range(len(ids) - 1):
        entry, row, token = prompt_logprobs[p + 1], ref[p], ids[p + 1]
        assert token in entry and len(entry) in (k, k + 1)
        got = entry[token]
        assert abs(got.logprob - row[token].item()) < ATOL, (p, got, row[token].item())
        # Rank: 1 + the tokens more likely; a near-tie (within ATOL) may fall either way.
        assert int((row > row[token] + ATOL).sum()) + 1 <= got.rank <= int((row > row[token] - ATOL).sum()) + 1
        top = sorted((lp for tid, lp in entry.items() if tid != token or lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, k + 1))
        ref_top = torch.topk(row, k).values
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < ATOL
            if lp.rank <= k:
                assert abs(lp.logprob - ref_top[lp.rank - 1].item()) < ATOL


def test_prompt_logprobs_match_transformers_through_chunked_prefill(tiny, embedded_gguf):
    folder, hf_model = tiny
    llm = _llm(folder, embedded_gguf)
    long, short, other = _prompt(1, 100), _prompt(2, 9), _prompt(3, 40)
    assert len(long) > llm.engine.scheduler.config.max_num_batched_tokens  # several chunks
    params = SamplingParams(prompt_logprobs=K, max_tokens=4, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": long}, {"prompt_token_ids": short}, {"prompt_token_ids": other}],
                        [params, params, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)],
                        use_tqdm=False)
    _check(outs[0].prompt_logprobs, long, _reference(hf_model, long))
    _check(outs[1].prompt_logprobs, short, _reference(hf_model, short))
    assert outs[2].prompt_logprobs is None
    # Scoring the prompt does not change what is generated.
    plain = llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0]
    assert outs[0].outputs[0].token_ids == plain.outputs[0].token_ids


def test_prompt_logprobs_zero_one_token_prompt_and_n(tiny, embedded_gguf):
    folder, hf_model = tiny
    llm = _llm(folder, embedded_gguf)
    ids = _prompt(4, 23)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(prompt_logprobs=0, max_tokens=2), use_tqdm=False)[0]
    _check(out.prompt_logprobs, ids, _reference(hf_model, ids), k=0)
    one = llm.generate({"prompt_token_ids": [5]}, SamplingParams(prompt_logprobs=3, max_tokens=2), use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]
    # n > 1: the samples share one prompt, scored once.
    many = llm.generate({"prompt_token_ids": ids}, SamplingParams(prompt_logprobs=K, n=3, seed=0, max_tokens=3),
                        use_tqdm=False)[0]
    assert len(many.outputs) == 3
    _check(many.prompt_logprobs, ids, _reference(hf_model, ids))


def test_prompt_logprobs_do_not_reuse_a_cached_prefix_but_cache_their_blocks(tiny, embedded_gguf):
    folder, hf_model = tiny
    llm = _llm(folder, embedded_gguf)
    kv = llm.engine.kv
    base = _prompt(5, 48)
    llm.generate({"prompt_token_ids": base}, SamplingParams(max_tokens=1), use_tqdm=False)
    scored_ids = base + _prompt(6, 20)
    hits = kv.prefix_hit_tokens
    out = llm.generate({"prompt_token_ids": scored_ids}, SamplingParams(prompt_logprobs=K, max_tokens=2),
                       use_tqdm=False)[0]
    assert kv.prefix_hit_tokens == hits  # every prompt position was computed, none reused
    _check(out.prompt_logprobs, scored_ids, _reference(hf_model, scored_ids))
    # The scoring request's own full blocks serve a later request past the first prompt's end.
    later = scored_ids + _prompt(7, 8)
    llm.generate({"prompt_token_ids": later}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert kv.prefix_hit_tokens - hits == len(scored_ids) // 4 * 4
    # And a cached prefix does not stop a second scoring of the same prompt from being exact.
    again = llm.generate({"prompt_token_ids": later}, SamplingParams(prompt_logprobs=K, max_tokens=1),
                         use_tqdm=False)[0]
    _check(again.prompt_logprobs, later, _reference(hf_model, later))


def test_prompt_logprobs_survive_preemption(tiny, embedded_gguf):
    folder, hf_model = tiny
    llm = _llm(folder, embedded_gguf, num_kv_blocks=40, max_model_len=128, enable_prefix_caching=False)
    prompts = [_prompt(10 + i, 30 + 7 * i) for i in range(3)]
    params = SamplingParams(prompt_logprobs=K, max_tokens=40, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outs):
        _check(out.prompt_logprobs, ids, _reference(hf_model, ids))


def test_only_requests_asking_for_prompt_logprobs_compute_extra_logits(tiny, embedded_gguf):
    folder, _ = tiny
    llm = _llm(folder, embedded_gguf, max_num_batched_tokens=2048)
    model = llm.engine.model
    rows: list[int] = []
    compute = model.compute_logits

    def counting(hidden):
        rows.append(hidden.shape[0])
        return compute(hidden)

    model.compute_logits = counting
    try:
        ids = _prompt(8, 50)
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert rows == [1, 1, 1]
        rows.clear()
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=1),
                     use_tqdm=False)
        assert rows == [1 + len(ids) - 1, 1, 1]
    finally:
        model.compute_logits = compute


def test_step_diff_carries_prompt_scoring_rows(tiny, embedded_gguf):
    folder, _ = tiny
    llm = _llm(folder, embedded_gguf)
    runner = llm.engine.runner
    encoder, decoder = StepDiffEncoder(), StepDiffDecoder(runner.block_size)
    build = runner.step_inputs
    scored_steps = []

    def checked(sched):
        inputs = build(sched)
        diff = encoder.encode([s.request.request_id for s in sched.seqs], inputs)
        assert decoder.decode(pickle.loads(pickle.dumps(diff))) == inputs
        scored_steps.append(len(inputs.prompt_rows))
        return inputs

    runner.step_inputs = checked
    params = SamplingParams(prompt_logprobs=2, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": _prompt(9, 45)}, {"prompt_token_ids": _prompt(10, 12)}],
                 [params, SamplingParams(max_tokens=3, ignore_eos=True)], use_tqdm=False)
    assert sum(scored_steps) == 44 and sum(1 for n in scored_steps if n) >= 2


def test_a_recomputed_prefix_overwrites_its_entries():
    req = Request("r", [1, 2, 3, 4], SamplingParams(prompt_logprobs=0), frozenset(), 16, parent_id="r")
    assert req.needs_prompt_logprobs
    req.record_prompt_logprobs(0, [(-1.0, 1, []), (-2.0, 2, [])])
    req.record_prompt_logprobs(0, [(-1.5, 1, [])])  # recomputed after preemption
    req.record_prompt_logprobs(1, [(-2.0, 2, []), (-3.0, 3, [])])
    assert [e[0] for e in req.prompt_logprobs] == [-1.5, -2.0, -3.0]
    assert not req.needs_prompt_logprobs
    with pytest.raises(RuntimeError):
        req.record_prompt_logprobs(5, [(-1.0, 1, [])])


@pytest.mark.parametrize("value", [-1, 21, True, 1.5])
def test_prompt_logprobs_is_validated(value):
    with pytest.raises(ValueError, match="^prompt_logprobs: "):
        SamplingParams(prompt_logprobs=value)


def test_encoder_decoder_models_refuse_prompt_logprobs(tmp_path, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path / "t5", "t5")
    llm = LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=64, max_model_len=128)
    with pytest.raises(ValueError, match="^prompt_logprobs: "):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(prompt_logprobs=1), use_tqdm=False)
