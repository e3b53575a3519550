"""Offline LLM.generate: an exception or Ctrl-C inside a step leaves no request behind, and the
next call returns its own outputs only."""

from __future__ import annotations

import pytest

from miaotui import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory, embedded_gguf):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("interrupt"), "llama")
    return LLM(str(folder), tokenizer=embedded_gguf, block_size=4, num_kv_blocks=256, quantization="none")


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "exception"])
def test_a_failed_step_leaves_no_request_behind(llm, monkeypatch, error):
    engine = llm.engine
    expected = llm.generate([[1, 2, 3], [4, 5, 6, 7]], PARAMS, use_tqdm=False)
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:  # mid-generation: the requests are running and hold KV blocks
            raise error("inside step")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(error):
        llm.generate([[1, 2, 3], [4, 5, 6, 7]], PARAMS, use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    assert engine.kv.num_free_blocks == engine.runner.num_blocks  # every block came back
    again = llm.generate([[1, 2, 3], [4, 5, 6, 7]], PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]


def test_outputs_of_other_requests_are_not_counted(llm):
    engine = llm.engine
    foreign = engine.add_request("someone-else", [9, 9, 9], SamplingParams(temperature=0, max_tokens=1))
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 6
    engine.abort_request(foreign)
