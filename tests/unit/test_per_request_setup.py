"""Per-request set-up is done once per request, not once per step: stop_token_ids membership
is a frozenset, and logit_bias tensors are built on the first step and reused."""

from __future__ import annotations

import pytest
import torch

from miaotui.request import Request, RequestStatus
from miaotui.sample import sampler as sampler_module
from miaotui.sample.sampler import Sampler
from miaotui.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_request(params: SamplingParams, rid: str = "r", seed: int | None = None) -> Request:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return Request(rid, [1, 2, 3], params, eos_token_ids=frozenset(), max_model_len=1000,
                   parent_id=rid, generator=gen)


class _Unscannable(list):
    def __contains__(self, item):
        raise AssertionError("stop_token_ids was scanned as a list")


def test_stop_token_ids_are_a_frozenset_built_once():
    params = SamplingParams(stop_token_ids=[7, 3, 7])
    assert params.stop_token_ids == [7, 3, 7]  # the user's list is kept as given
    assert params.stop_token_id_set == frozenset({3, 7})
    assert isinstance(params.stop_token_id_set, frozenset)
    assert SamplingParams().stop_token_id_set == frozenset()


def test_check_token_stop_uses_the_set():
    params = SamplingParams(stop_token_ids=[9], max_tokens=10)
    params.stop_token_ids = _Unscannable(params.stop_token_ids)
    request = make_request(params)
    request.append_output_token(4)
    request.check_token_stop()
    assert request.status == RequestStatus.WAITING
    request.append_output_token(9)
    request.check_token_stop()
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 9


def _reference_biased_choice(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The sampler's old per-step path: tensors built from the dict, then the exponential race."""
    ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
    bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    row = logits.index_add(0, ids, bias)
    if params.greedy:
        return int(row.argmax())
    probs = (row / params.temperature).softmax(-1)
    return int((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logit_bias_tensors_built_once_per_request_and_results_unchanged(monkeypatch, temperature):
    built = []
    real = sampler_module.build_logit_bias

    def counting(logit_bias, like):
        built.append(dict(logit_bias))
        return real(logit_bias, like)

    monkeypatch.setattr(sampler_module, "build_logit_bias", counting)
    params = SamplingParams(temperature=temperature, logit_bias={5: 3.0, 1: -100.0, 7: 1.5})
    requests = [make_request(params, rid=f"r{i}", seed=i) for i in range(3)]
    references = [torch.Generator().manual_seed(i) for i in range(3)]
    sampler = Sampler(seed=0, device=CPU)
    logits_gen = torch.Generator().manual_seed(11)
    for _ in range(50):
        logits = torch.randn(3, 10, generator=logits_gen)
        out = sampler(logits, requests)
        assert out.token_ids == [_reference_biased_choice(logits[i].float(), params, references[i])
                                 for i in range(3)]
    assert len(built) == len(requests)  # one build per request over 50 steps
    ids, bias = requests[0].logit_bias_tensors
    assert ids.tolist() == [5, 1, 7] and bias.tolist() == [3.0, -100.0, 1.5]
