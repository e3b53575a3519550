"""Scheduler + KV cache manager on CPU, without a model (tests/scheduler_harness.py plays the
forward pass): token budget and chunked prefill, order, preemption, finishing and aborts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from miaotui.request import Request, RequestStatus
from tests.scheduler_harness import (EOS, assert_all_free, count_token, growing_pair, make, make_req, seq_table,
                                     step_until_preempted, tokens)


# --- token budget, chunked prefill, order -------------------------------------------------------

def test_long_prompt_is_chunked_and_samples_only_on_its_last_chunk():
    sched, kv, runner = make(budget=16)
    a = make_req("a", tokens(40), max_tokens=3, ignore_eos=True)
    sched.add(a)
    tables = [seq_table(runner.step()) for _ in range(5)]
    assert tables == [
        [("a", 0, 16, False)],
        [("a", 16, 16, False)],
        [("a", 32, 8, True)],
        [("a", 40, 1, True)],
        [("a", 41, 1, True)],
    ]
    assert a.output_token_ids == [100, 101, 102]
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(sched, kv)


def test_no_step_exceeds_token_budget_or_max_num_seqs():
    sched, kv, runner = make(128, max_num_seqs=3, budget=10)
    lens = [3, 25, 7, 12, 1, 18, 9]
    reqs = [make_req(f"r{i}", tokens(n, 10 + 30 * i), max_tokens=2 + i, ignore_eos=True)
            for i, n in enumerate(lens)]
    for r in reqs:
        sched.add(r)
    outs = runner.drain()  # the runner asserts the limits on every step
    assert max(o.num_tokens for o in outs) == 10  # the budget is filled, not just respected
    assert max(len(o.seqs) for o in outs) == 3
    for r, n in zip(reqs, lens):
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert len(r.output_token_ids) == r.sampling_params.max_tokens
        # every token but the last sampled one is computed exactly once (no preemption here)
        assert runner.computed[r.request_id] == n + r.sampling_params.max_tokens - 1
    assert sched.num_preemptions == 0
    assert_all_free(sched, kv)


def test_decodes_are_scheduled_before_new_prompts():
    sched, kv, runner = make(budget=8)
    a = make_req("a", tokens(4), max_tokens=4, ignore_eos=True)
    sched.add(a)
    assert seq_table(runner.step()) == [("a", 0, 4, True)]
    sched.add(make_req("b", tokens(20, 50), max_tokens=2, ignore_eos=True))
    assert seq_table(runner.step()) == [("a", 4, 1, True), ("b", 0, 7, False)]
    assert seq_table(runner.step()) == [("a", 5, 1, True), ("b", 7, 7, False)]
    runner.drain()
    assert_all_free(sched, kv)


def test_waiting_requests_are_admitted_in_arrival_order_until_the_budget_is_spent():
    sched, kv, runner = make(budget=10)
    for rid, n in (("a", 6), ("b", 6), ("c", 2)):
        sched.add(make_req(rid, tokens(n, 10 + 10 * len(sched.requests)), max_tokens=2, ignore_eos=True))
    assert seq_table(runner.step()) == [("a", 0, 6, True), ("b", 0, 4, False)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    assert seq_table(runner.step()) == [("a", 6, 1, True), ("b", 4, 2, True), ("c", 0, 2, True)]
    runner.drain()
    assert_all_free(sched, kv)


def test_fcfs_with_one_seat():
    sched, kv, runner = make(max_num_seqs=1)
    for rid in "abc":
        sched.add(make_req(rid, tokens(3), max_tokens=2, ignore_eos=True))
    order = [s.request.request_id for o in runner.drain() for s in o.seqs]
    assert order == ["a", "a", "b", "b", "c", "c"]
    assert_all_free(sched, kv)


def test_head_of_line_request_that_does_not_fit_blocks_later_ones():
    # 8 blocks; r holds 6 once decoding; a needs 4 for its prompt, b would need only 1.
    sched, kv, runner = make(8)
    r = make_req("r", tokens(20), max_tokens=3, ignore_eos=True, max_model_len=32)
    sched.add(r)
    runner.step()
    sched.add(make_req("a", tokens(16, 40), max_tokens=1))
    sched.add(make_req("b", tokens(4, 70), max_tokens=1))
    out = runner.step()
    assert seq_table(out) == [("r", 20, 1, True)]
    assert [w.request_id for w in sched.waiting] == ["a", "b"]
    outs = runner.drain()
    first = [next(s.request.request_id for o in outs for s in o.seqs if s.request.request_id == x)
             for x in ("a", "b")]
    assert first == ["a", "b"]
    assert_all_free(sched, kv)


# --- preemption ---------------------------------------------------------------------------------

def test_newest_running_request_is_preempted_and_later_completes():
    # 10 blocks of 4 = 40 tokens; a and b each grow to 31 computed tokens (8 blocks).
    sched, kv, runner = make(10)
    a, b = growing_pair()
    sched.add(a)
    sched.add(b)
    out = step_until_preempted(runner)
    assert out.preempted == ["b"]
    assert sched.num_preemptions == 1
    assert [s.request.request_id for s in out.seqs] == ["a"]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.status is RequestStatus.WAITING
    assert sched.waiting[0] is b and sched.running == [a]
    assert len(b.output_token_ids) == 9  # outputs survive; only K/V is recomputed
    hits_before = kv.prefix_hit_tokens
    outs = runner.drain()
    # b comes back after a finishes: its first two blocks were freed last, so they are still
    # cached; its prompt + 9 outputs (21 tokens) is recomputed from token 8 in one chunk.
    resumed = [t for o in outs for t in seq_table(o) if t[0] == "b"][0]
    assert resumed == ("b", 8, 13, True)
    assert kv.prefix_hit_tokens - hits_before == 8
    assert a.output_token_ids == b.output_token_ids == list(range(100, 120))
    assert runner.computed["b"] == 20 + 13 + 10  # before, recompute, after
    assert_all_free(sched, kv)


def test_preemption_puts_the_victim_at_the_front_of_waiting():
    sched, kv, runner = make(10, max_num_seqs=2)
    a, b = growing_pair()
    c = make_req("c", tokens(4, 80), max_tokens=1)
    for r in (a, b, c):
        sched.add(r)
    step_until_preempted(runner)
    assert [w.request_id for w in sched.waiting] == ["b", "c"]
    runner.drain()
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in (a, b, c))
    assert_all_free(sched, kv)


# --- finishing ----------------------------------------------------------------------------------

def _eos_on(n: int, token: int = EOS) -> Callable[[Request], int]:
    return lambda r: token if len(r.output_token_ids) + 1 == n else count_token(r)


def test_finish_on_eos_frees_blocks_at_once():
    sched, kv, runner = make()
    a = make_req("a", tokens(6), max_tokens=10)
    b = make_req("b", tokens(6, 40), max_tokens=10, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        runner.step(_eos_on(3))
    assert a.status is RequestStatus.FINISHED_STOPPED and a.finish_reason == "stop"
    assert a.output_token_ids == [100, 101, EOS]
    assert a.block_ids == [] and a not in sched.running and "a" not in sched.requests
    assert kv.num_free_blocks == kv.pool.num_blocks - len(b.block_ids)
    assert b.status is RequestStatus.RUNNING  # ignore_eos: the same EOS does not stop b
    runner.drain(_eos_on(3))
    assert b.status is RequestStatus.FINISHED_LENGTH and len(b.output_token_ids) == 10
    assert b.output_token_ids[2] == EOS
    assert_all_free(sched, kv)


def test_eos_is_ignored_before_min_tokens():
    sched, kv, runner = make()
    a = make_req("a", tokens(5), max_tokens=10, min_tokens=3)
    sched.add(a)
    runner.drain(lambda r: EOS)
    assert a.output_token_ids == [EOS] * 3 and a.status is RequestStatus.FINISHED_STOPPED
    assert_all_free(sched, kv)


def test_finish_on_stop_token_id_records_the_reason():
    sched, kv, runner = make()
    a = make_req("a", tokens(5), max_tokens=10, stop_token_ids=[55])
    sched.add(a)
    runner.drain(_eos_on(2, 55))
    assert a.output_token_ids == [100, 55]
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason == 55
    assert_all_free(sched, kv)


def test_finish_on_max_tokens():
    sched, kv, runner = make()
    a = make_req("a", tokens(5), max_tokens=4)
    sched.add(a)
    outs = runner.drain()
    assert len(outs) == 4 and a.output_token_ids == [100, 101, 102, 103]
    assert a.status is RequestStatus.FINISHED_LENGTH and a.finish_reason == "length"
    assert_all_free(sched, kv)


@pytest.mark.parametrize("max_tokens", [None, 50])
def test_finish_at_max_model_len(max_tokens):
    sched, kv, runner = make()
    a = make_req("a", tokens(10), max_tokens=max_tokens, max_model_len=14, ignore_eos=True)
    sched.add(a)
    runner.drain()
    assert len(a.output_token_ids) == 4 and a.num_tokens == 14
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(sched, kv)


# --- finishing from outside (abort, stop strings) -----------------------------------------------

def test_abort_running_request_frees_its_blocks_immediately():
    sched, kv, runner = make(budget=8)
    a = make_req("a", tokens(20), max_tokens=5)  # mid-prefill when aborted
    b = make_req("b", tokens(3, 50), max_tokens=5)
    sched.add(b)
    sched.add(a)
    runner.step()
    assert a.status is RequestStatus.RUNNING and len(a.block_ids) == 2
    held = len(b.block_ids)
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    assert a.block_ids == [] and a not in sched.running and "a" not in sched.requests
    assert kv.num_free_blocks == kv.pool.num_blocks - held
    outs = runner.drain()
    assert all(s.request is not a for o in outs for s in o.seqs)
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(sched, kv)


def test_abort_waiting_request_removes_it_from_the_queue():
    sched, kv, runner = make(max_num_seqs=1)
    a = make_req("a", tokens(5), max_tokens=3)
    b = make_req("b", tokens(5, 50), max_tokens=3)
    sched.add(a)
    sched.add(b)
    runner.step()
    assert list(sched.waiting) == [b]
    sched.finish("b", RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting and b.status is RequestStatus.FINISHED_ABORTED and b.block_ids == []
    outs = runner.drain()
    assert all(s.request is not b for o in outs for s in o.seqs) and b.output_token_ids == []
    assert_all_free(sched, kv)


def test_abort_preempted_request_and_unknown_or_repeated_ids():
    sched, kv, runner = make(10)
    a, b = growing_pair()
    sched.add(a)
    sched.add(b)
    step_until_preempted(runner)
    sched.finish("b", RequestStatus.FINISHED_ABORTED)
    sched.finish("b", RequestStatus.FINISHED_STOPPED)  # already finished: ignored
    sched.finish("nope", RequestStatus.FINISHED_ABORTED)
    assert b.status is RequestStatus.FINISHED_ABORTED and not sched.waiting
    runner.drain()
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(sched, kv)


def test_finish_with_stop_reason_from_outside():
    sched, kv, runner = make()
    a = make_req("a", tokens(5), max_tokens=10)
    sched.add(a)
    runner.step()
    sched.finish("a", RequestStatus.FINISHED_STOPPED, "###")
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason == "###"
    assert_all_free(sched, kv)
