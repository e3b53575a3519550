"""Output kinds (vLLM's RequestOutputKind): DELTA outputs hold only what is new and add up to the
CUMULATIVE output; FINAL_ONLY sends one; the async stream of a reader that stops stays bounded."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest

from miaotui import RequestOutputKind, SamplingParams
from miaotui.engine.async_engine import _Stream
from miaotui.outputs import CompletionOutput, RequestOutput


def _run(engine, params: SamplingParams, prompt: list[int], rid: str) -> list[RequestOutput]:
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [copy.deepcopy(o) for o in engine.step() if o.request_id == rid]
    return outs


def _params(kind: RequestOutputKind) -> SamplingParams:
    # Seeded sampling, two samples, logprobs and a stop string: every field a delta carries.
    return SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=24, logprobs=2, stop=["e t"],
                          prompt_logprobs=1, output_kind=kind)


def _fields(o: CompletionOutput) -> tuple:
    return o.index, o.text, o.token_ids, o.cumulative_logprob, o.logprobs, o.finish_reason, o.stop_reason


def test_deltas_hold_only_the_new_tokens_and_add_up_to_the_cumulative_output(engine_llm):
    engine = engine_llm.engine
    prompt = list(range(10, 30))
    cumulative = _run(engine, _params(RequestOutputKind.CUMULATIVE), prompt, "cum")
    deltas = _run(engine, _params(RequestOutputKind.DELTA), prompt, "delta")
    assert len(deltas) == len(cumulative) > 2
    whole = copy.deepcopy(deltas[0])
    for d in deltas[1:]:
        whole.add_delta(d)
    final = cumulative[-1]
    assert whole.finished and final.finished
    assert [_fields(o) for o in whole.outputs] == [_fields(o) for o in final.outputs]
    assert whole.prompt_logprobs == final.prompt_logprobs
    # Each delta carries each sample's new tokens only: one per step, none twice.
    total = sum(len(o.token_ids) for o in final.outputs)
    assert sum(len(o.token_ids) for d in deltas for o in d.outputs) == total
    assert all(len(o.token_ids) <= 1 for d in deltas for o in d.outputs)


def test_final_only_sends_one_whole_output(engine_llm):
    engine = engine_llm.engine
    prompt = list(range(40, 52))
    cumulative = _run(engine, _params(RequestOutputKind.CUMULATIVE), prompt, "cum2")
    final = _run(engine, _params(RequestOutputKind.FINAL_ONLY), prompt, "final")
    assert len(final) == 1 and final[0].finished
    assert [_fields(o) for o in final[0].outputs] == [_fields(o) for o in cumulative[-1].outputs]


def test_offline_generate_returns_whole_outputs_whatever_kind_the_caller_set(engine_llm):
    prompt = {"prompt_token_ids": list(range(60, 70))}
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = engine_llm.generate(prompt, base, use_tqdm=False)[0].outputs[0]
    for kind in RequestOutputKind:
        out = engine_llm.generate(prompt, dataclasses.replace(base, output_kind=kind), use_tqdm=False)[0]
        assert out.finished and out.outputs[0].token_ids == expected.token_ids
        assert out.outputs[0].text == expected.text and len(expected.token_ids) == 12


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind: must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")


def _delta(index: int, text: str, token: int, finished: bool = False) -> RequestOutput:
    out = CompletionOutput(index, text, [token], -1.0, None, "stop" if finished else None)
    return RequestOutput("r", None, [1], [out], finished)


def test_a_stream_whose_reader_stops_merges_instead_of_queueing():
    async def main():
        stream = _Stream(asyncio.get_running_loop(), delta=True, limit=8)
        for t in range(1000):
            stream._deliver(_delta(t % 2, "ab", t))  # two samples, interleaved
        assert len(stream.items) == 8
        stream._deliver(RuntimeError("engine failed"))  # an error is never merged away
        assert isinstance(stream.items[-1], RuntimeError)
        whole = await stream.get()
        while not isinstance(stream.items[0], RuntimeError):
            whole.add_delta(await stream.get())
        assert {o.index: o.token_ids for o in whole.outputs} == {0: list(range(0, 1000, 2)),
                                                                 1: list(range(1, 1000, 2))}
        assert all(o.text == "ab" * 500 for o in whole.outputs)
        assert isinstance(await stream.get(), RuntimeError)

    asyncio.run(main())


def test_a_cumulative_stream_keeps_only_the_newest_output_when_full():
    async def main():
        stream = _Stream(asyncio.get_running_loop(), delta=False, limit=2)
        for t in range(10):
            stream._deliver(_delta(0, "x" * t, t))
        assert len(stream.items) == 2
        assert (await stream.get()).outputs[0].token_ids == [0]
        assert (await stream.get()).outputs[0].token_ids == [9]

    asyncio.run(main())


def test_add_delta_takes_a_sample_first_seen_in_a_later_delta():
    whole = _delta(1, "b", 2)
    whole.add_delta(_delta(0, "a", 1))
    whole.add_delta(_delta(1, "c", 3, finished=True))
    assert [(o.index, o.text, o.token_ids) for o in whole.outputs] == [(0, "a", [1]), (1, "bc", [2, 3])]
    assert whole.finished and whole.outputs[1].finish_reason == "stop"
