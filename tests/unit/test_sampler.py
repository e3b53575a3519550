"""Sampler, apply_penalties and filter_logits on hand-made logits (no model).

Reference implementations: transformers' logits processors for temperature / top-k / top-p /
min-p / repetition penalty, the OpenAI formula for presence / frequency penalties, and
softmax(logits) for the sampled distribution (chi-square goodness of fit).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from miaotui.request import Request
from miaotui.sample.sampler import Sampler, SamplerOutput, apply_penalties, filter_logits
from miaotui.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_request(params: SamplingParams, prompt=(1, 2, 3), output=(), seed: int | None = None,
                 rid: str = "r") -> Request:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    req = Request(rid, list(prompt), params, eos_token_ids=frozenset(), max_model_len=1000,
                  parent_id=rid, generator=gen)
    for t in output:
        req.append_output_token(t)
    return req


def sample_one(sampler: Sampler, logits_row: torch.Tensor, request: Request) -> tuple[int, object]:
    out = sampler(logits_row[None], [request])
    return out.token_ids[0], out.logprobs[0]


# ---------------------------------------------------------------- greedy


def test_greedy_picks_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 100, generator=gen) * 4
    reqs = [make_request(SamplingParams(temperature=0.0), rid=f"r{i}") for i in range(32)]
    out = Sampler(seed=0, device=CPU)(logits, reqs)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 32


def test_top_k_1_equals_greedy_on_random_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 64, generator=gen) * 3
    sampler = Sampler(seed=123, device=CPU)
    greedy = sampler(logits, [make_request(SamplingParams(temperature=0), rid=f"g{i}")
                              for i in range(200)]).token_ids
    topk1 = sampler(logits, [make_request(SamplingParams(temperature=1.0, top_k=1), rid=f"k{i}")
                             for i in range(200)]).token_ids
    assert topk1 == greedy == logits.argmax(-1).tolist()


def test_sampler_does_not_modify_input_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=gen)
    before = logits.clone()
    params = [SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, frequency_penalty=1.0),
              SamplingParams(logprobs=2)]
    reqs = [make_request(p, prompt=[0, 1, 2], output=[3, 3, 4], seed=i, rid=f"r{i}")
            for i, p in enumerate(params)]
    Sampler(seed=0, device=CPU)(logits, reqs)
    assert torch.equal(logits, before)


def test_half_precision_logits_are_accepted():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]], dtype=torch.bfloat16)
    out = Sampler(seed=0, device=CPU)(logits, [make_request(SamplingParams(temperature=0, logprobs=1))])
    assert out.token_ids == [1]
    expected = torch.log_softmax(logits.float(), -1)[0, 1].item()
    assert out.logprobs[0][0] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- seeds


def _draws(seed: int, n: int = 50) -> list[int]:
    logits = torch.zeros(16)  # uniform over 16 tokens: draws vary a lot
    sampler = Sampler(seed=0, device=CPU)
    req = make_request(SamplingParams(temperature=1.0, seed=seed), seed=seed)
    return [sample_one(sampler, logits, req)[0] for _ in range(n)]


def test_same_seed_same_sequence():
    a, b = _draws(7), _draws(7)
    assert a == b
    assert len(set(a)) > 5  # really random, not a constant


def test_different_seeds_differ():
    assert _draws(7) != _draws(8)
    assert _draws(1) != _draws(2)


def test_seeded_request_ignores_sampler_seed():
    logits = torch.zeros(16)
    seqs = []
    for sampler_seed in (0, 1):
        sampler = Sampler(seed=sampler_seed, device=CPU)
        req = make_request(SamplingParams(seed=5), seed=5)
        seqs.append([sample_one(sampler, logits, req)[0] for _ in range(30)])
    assert seqs[0] == seqs[1]


def test_unseeded_requests_follow_sampler_seed():
    logits = torch.zeros(16)

    def run(sampler_seed: int) -> list[int]:
        sampler = Sampler(seed=sampler_seed, device=CPU)
        req = make_request(SamplingParams())
        return [sample_one(sampler, logits, req)[0] for _ in range(30)]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ---------------------------------------------------------------- distribution

DIST_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
N_DRAWS = 20_000
N_FILTERED_DRAWS = 6_000


def _counts(logits_row: torch.Tensor, params: SamplingParams, seed: int = 0, n: int = N_DRAWS) -> torch.Tensor:
    """n independent draws: one batch of n unseeded rows (they share the sampler's generator)."""
    req = make_request(params)
    out = Sampler(seed=seed, device=CPU)(logits_row.expand(n, -1), [req] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.shape[-1]).double()


@pytest.fixture(scope="module")
def t1_counts() -> torch.Tensor:
    return _counts(DIST_LOGITS, SamplingParams(temperature=1.0), seed=2024)


def test_distribution_matches_softmax(t1_counts):
    expected = torch.softmax(DIST_LOGITS.double(), -1) * N_DRAWS
    assert t1_counts.sum() == N_DRAWS
    p = chisquare(t1_counts.numpy(), expected.numpy()).pvalue
    assert p > 1e-3


def test_distribution_check_can_fail(t1_counts):
    # Wrong reference distributions must be rejected, so the test above has teeth.
    for wrong_logits in (DIST_LOGITS * 1.3, torch.zeros(8), DIST_LOGITS.flip(0)):
        wrong = torch.softmax(wrong_logits.double(), -1) * N_DRAWS
        assert chisquare(t1_counts.numpy(), wrong.numpy()).pvalue < 1e-6


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.5, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.2, min_p=0.2),
], ids=["T0.6", "T1.5-k5", "T0.9-p0.8", "T1.2-minp0.2"])
def test_filtered_distribution_matches_reference(params):
    counts = _counts(DIST_LOGITS, params, seed=99, n=N_FILTERED_DRAWS)
    ref = _hf_filter(DIST_LOGITS, params.temperature, params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(ref.double(), -1)
    kept = torch.isfinite(ref)
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    assert counts.sum() == N_FILTERED_DRAWS
    p = chisquare(counts[kept].numpy(), (probs[kept] * N_FILTERED_DRAWS).numpy()).pvalue
    assert p > 1e-3
    if kept.all():  # no token filtered: ignoring the temperature would be caught
        unscaled = torch.softmax(DIST_LOGITS.double(), -1) * N_FILTERED_DRAWS
        assert chisquare(counts.numpy(), unscaled.numpy()).pvalue < 1e-6
    else:  # the filter really removed tokens (sampling them would fail the check above)
        assert (probs[kept].sum() - 1).abs() < 1e-9 and (~kept).sum() >= 2


# ---------------------------------------------------------------- filtering vs transformers


def _hf_filter(row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = row[None].clone()
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    scores = TopPLogitsWarper(top_p)(ids, scores)
    scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores[0]


FILTER_GRID = list(itertools.product(
    [0.3, 1.0, 1.8],                 # temperature
    [0, -1, 1, 3, 10, 64, 100],      # top_k (0 / -1 disable, 64 == V, 100 > V)
    [1.0, 0.95, 0.6, 0.2],           # top_p
    [0.0, 0.02, 0.3],                # min_p
))


def test_filter_logits_matches_transformers_processors():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 64, generator=gen) * 3
    any_filtered = 0
    for (temperature, top_k, top_p, min_p), row in itertools.product(FILTER_GRID, rows):
        ours = filter_logits(row / temperature, top_k, top_p, min_p)
        ref = _hf_filter(row, temperature, top_k, top_p, min_p)
        ctx = f"T={temperature} k={top_k} p={top_p} min_p={min_p}"
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), ctx
        finite = torch.isfinite(ref)
        assert finite.any(), ctx
        torch.testing.assert_close(ours[finite], ref[finite], atol=1e-6, rtol=0, msg=ctx)
        any_filtered += int((~finite).any())
    assert any_filtered > len(FILTER_GRID)  # the grid really exercises the filters


@pytest.mark.parametrize(("top_k", "top_p", "min_p", "kept"), [
    (2, 1.0, 0.0, {0, 1}),
    (0, 0.5, 0.0, {0}),          # p0 ~= 0.64 alone covers 0.5
    (0, 0.7, 0.0, {0, 1}),
    (0, 1.0, 0.3, {0, 1}),       # p1/p0 = e^-1 ~= 0.37 >= 0.3, p2/p0 = e^-2 < 0.3
    (0, 1.0, 0.1, {0, 1, 2}),
    (-1, 1.0, 0.0, {0, 1, 2, 3}),
])
def test_filter_logits_hand_cases(top_k, top_p, min_p, kept):
    row = torch.tensor([3.0, 2.0, 1.0, -1.0])
    out = filter_logits(row, top_k, top_p, min_p)
    assert {i for i in range(4) if torch.isfinite(out[i])} == kept
    assert torch.equal(out[list(kept)], row[list(kept)])  # kept logits are untouched


def test_filtered_tokens_are_never_sampled():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(50, generator=gen) * 2
    top5 = set(torch.topk(row, 5).indices.tolist())
    sampler = Sampler(seed=0, device=CPU)
    req = make_request(SamplingParams(temperature=2.0, top_k=5), seed=0)
    drawn = {sample_one(sampler, row, req)[0] for _ in range(300)}
    assert drawn == top5


# ---------------------------------------------------------------- penalties


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        row = torch.randn(40, generator=gen) * 3
        prompt = torch.randint(0, 40, (12,), generator=gen).tolist()
        output = torch.randint(0, 40, (7,), generator=gen).tolist()
        ids = prompt + output
        ours = apply_penalties(row.clone(), ids, output, penalty, 0.0, 0.0)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), row[None].clone())[0]
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
        untouched = [t for t in range(40) if t not in ids]
        assert torch.equal(ours[untouched], row[untouched])
        assert not torch.equal(ours, row)


def test_repetition_penalty_hand_values():
    row = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_penalties(row.clone(), [0, 1, 1, 0], [], 2.0, 0.0, 0.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]  # applied once per distinct token


def _openai_reference(row: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    expected = row.clone()
    for t in range(row.shape[0]):
        count = output.count(t)
        expected[t] -= frequency * count + presence * (1.0 if count > 0 else 0.0)
    return expected


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (1.0, 0.3), (-0.5, 2.0), (2.0, -1.0)])
def test_presence_frequency_penalty_openai_formula(presence, frequency):
    gen = torch.Generator().manual_seed(6)
    for _ in range(10):
        row = torch.randn(30, generator=gen)
        prompt = torch.randint(0, 15, (10,), generator=gen).tolist()
        output = torch.randint(10, 30, (12,), generator=gen).tolist()  # repeats are likely
        ours = apply_penalties(row.clone(), prompt + output, output, 1.0, presence, frequency)
        expected = _openai_reference(row, output, presence, frequency)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
        prompt_only = [t for t in set(prompt) if t not in output]
        assert prompt_only
        assert torch.equal(ours[prompt_only], row[prompt_only])


def test_presence_frequency_hand_values():
    row = torch.zeros(5)
    # token 0 only in the prompt; token 1 once, token 2 three times in the output.
    out = apply_penalties(row.clone(), [0, 0, 1, 2, 2, 2], [1, 2, 2, 2], 1.0, 0.5, 0.25)
    assert out.tolist() == pytest.approx([0.0, -0.75, -1.25, 0.0, 0.0])


def test_repetition_then_presence_frequency():
    gen = torch.Generator().manual_seed(7)
    row = torch.randn(20, generator=gen) * 2
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 5]
    ours = apply_penalties(row.clone(), prompt + output, output, 1.5, 0.4, 0.6)
    rep = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), row[None].clone())[0]
    expected = _openai_reference(rep, output, 0.4, 0.6)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_sampler_applies_penalties_over_request_history():
    # Token 5 is the raw argmax; it was output twice, so a frequency penalty flips greedy to 3.
    row = torch.zeros(8)
    row[5], row[3] = 2.0, 1.5
    sampler = Sampler(seed=0, device=CPU)
    no_pen = make_request(SamplingParams(temperature=0), output=[5, 5])
    assert sample_one(sampler, row, no_pen)[0] == 5
    freq = make_request(SamplingParams(temperature=0, frequency_penalty=0.3), output=[5, 5])
    assert sample_one(sampler, row, freq)[0] == 3
    # In the prompt only: presence / frequency do not apply ...
    prompt_only = make_request(SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0),
                               prompt=[5, 5, 5], output=[1])
    assert sample_one(sampler, row, prompt_only)[0] == 5
    # ... but repetition penalty does (2.0 / 2 = 1.0 < 1.5).
    rep = make_request(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[5], output=[])
    assert sample_one(sampler, row, rep)[0] == 3


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("params", [
    SamplingParams(logprobs=3, seed=11),
    SamplingParams(logprobs=3, temperature=0),
    SamplingParams(logprobs=3, temperature=0.5, top_k=4, repetition_penalty=1.7, presence_penalty=1.0),
], ids=["T1", "greedy", "processed"])
def test_logprobs_are_raw_log_softmax_and_topk(params):
    gen = torch.Generator().manual_seed(8)
    sampler = Sampler(seed=0, device=CPU)
    req = make_request(params, prompt=[0, 1, 2], output=[3, 4], seed=11)
    for _ in range(20):
        row = torch.randn(30, generator=gen) * 2
        token, lp = sample_one(sampler, row, req)
        raw = torch.log_softmax(row, -1)
        sampled_lp, top = lp
        assert sampled_lp == pytest.approx(raw[token].item(), abs=1e-6)
        ref = torch.topk(raw, 3)
        assert [t for t, _ in top] == ref.indices.tolist()
        assert [v for _, v in top] == pytest.approx(ref.values.tolist(), abs=1e-6)
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert all(isinstance(t, int) and isinstance(v, float) for t, v in top)


def test_logprobs_zero_and_none():
    row = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    reqs = [make_request(SamplingParams(temperature=0, logprobs=0), rid="a"),
            make_request(SamplingParams(temperature=0), rid="b")]
    out = Sampler(seed=0, device=CPU)(row, reqs)
    assert out.token_ids == [2, 2]
    sampled_lp, top = out.logprobs[0]
    assert top == []
    assert sampled_lp == pytest.approx(torch.log_softmax(row[0], -1)[2].item(), abs=1e-6)
    assert out.logprobs[1] is None


# ---------------------------------------------------------------- batch invariance

BATCH_PARAMS = [
    SamplingParams(temperature=1.0, seed=10, logprobs=2),
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.7, top_k=5, seed=11),
    SamplingParams(temperature=1.3, top_p=0.8, seed=12, logprobs=1),
    SamplingParams(temperature=1.0, min_p=0.1, seed=13),
    SamplingParams(temperature=0.9, repetition_penalty=1.4, presence_penalty=0.5,
                   frequency_penalty=0.3, seed=14, logprobs=3),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.9, min_p=0.05, seed=15),
    SamplingParams(temperature=1.0),  # unseeded: uses the sampler's generator, compared only in-batch
]


def test_batch_rows_equal_rows_sampled_alone():
    V, steps = 50, 25
    gen = torch.Generator().manual_seed(9)
    batch_sampler = Sampler(seed=0, device=CPU)
    alone_sampler = Sampler(seed=12345, device=CPU)  # a different sampler seed must not matter
    seeds = [p.seed for p in BATCH_PARAMS]
    prompt = [1, 2, 3, 4]
    batch_reqs = [make_request(p, prompt=prompt, seed=s, rid=f"b{i}") for i, (p, s) in enumerate(zip(BATCH_PARAMS, seeds))]
    alone_reqs = [make_request(p, prompt=prompt, seed=s, rid=f"a{i}") for i, (p, s) in enumerate(zip(BATCH_PARAMS, seeds))]
    comparable = [i for i, p in enumerate(BATCH_PARAMS) if p.seed is not None or p.greedy]
    distinct = {i: set() for i in comparable}
    for _ in range(steps):
        logits = torch.randn(len(BATCH_PARAMS), V, generator=gen) * 2
        batch = batch_sampler(logits, batch_reqs)
        for i in comparable:
            token, lp = sample_one(alone_sampler, logits[i].clone(), alone_reqs[i])
            assert batch.token_ids[i] == token, f"row {i}"
            if lp is None:
                assert batch.logprobs[i] is None
            else:
                b_lp, b_top = batch.logprobs[i]
                assert b_lp == pytest.approx(lp[0], abs=1e-6)
                assert [t for t, _ in b_top] == [t for t, _ in lp[1]]
                assert [v for _, v in b_top] == pytest.approx([v for _, v in lp[1]], abs=1e-6)
            distinct[i].add(token)
        for i, req in enumerate(batch_reqs):
            req.append_output_token(batch.token_ids[i])
            alone_reqs[i].append_output_token(batch.token_ids[i])
    # Sampled (non-greedy) rows really varied across steps.
    assert all(len(distinct[i]) > 3 for i in comparable if not BATCH_PARAMS[i].greedy)


def test_batch_order_does_not_change_seeded_rows():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 30, generator=gen)
    params = [SamplingParams(seed=s, temperature=1.0) for s in (1, 2, 3)] + [SamplingParams()]
    fwd = Sampler(seed=0, device=CPU)(logits, [make_request(p, seed=p.seed, rid=str(i)) for i, p in enumerate(params)])
    order = [3, 2, 0, 1]
    rev = Sampler(seed=7, device=CPU)(logits[order], [make_request(params[i], seed=params[i].seed, rid=str(i))
                                                      for i in order])
    for pos, i in enumerate(order):
        if params[i].seed is not None:
            assert rev.token_ids[pos] == fwd.token_ids[i]


# ---------------------------------------------------------------- logit_bias


def test_logit_bias_shifts_choice_but_not_reported_logprobs():
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0, logit_bias={2: 5.0, 0: -100.0}, logprobs=1)
    token, (lp, top) = sample_one(Sampler(seed=0, device=CPU), logits, make_request(params))
    assert token == 2  # 0 + 5 beats 1; token 0 is pushed down by 100
    raw = torch.log_softmax(logits, -1)
    assert lp == pytest.approx(raw[2].item()) and top[0][0] == 0  # raw model logprobs


def test_logit_bias_in_sampling_matches_biased_softmax():
    logits = torch.zeros(4)
    params = SamplingParams(temperature=1.0, logit_bias={3: 2.0})
    sampler = Sampler(seed=5, device=CPU)
    counts = torch.zeros(4)
    for i in range(4000):
        counts[sample_one(sampler, logits, make_request(params, rid=f"b{i}"))[0]] += 1
    expected = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 2.0]), -1) * 4000
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4


@pytest.mark.parametrize("bias", [{1: 101.0}, {-1: 1.0}, {"1": 1.0}, {1: float("nan")}, [1, 2]])
def test_logit_bias_validation_names_the_field(bias):
    with pytest.raises(ValueError, match="^logit_bias: "):
        SamplingParams(logit_bias=bias)
