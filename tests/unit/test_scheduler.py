"""Scheduler + KV cache manager on CPU, without a model: a fake runner plays the forward pass.

The fake runner keeps, for every KV slot, the token prefix whose K/V it would hold, applies the
scheduler's block copies, and checks on every step that each scheduled sequence finds its own
computed prefix in its blocks and writes only into blocks nobody else holds. So a wrong prefix
hit, a missed copy or a shared block written in place fails here, not only as wrong text later.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from miaotui.config import SchedulerConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.scheduler import Scheduler, SchedulerOutput
from miaotui.request import Request, RequestStatus
from miaotui.sampling_params import SamplingParams
from tests.fake_kv import apply_block_copies

BS = 4
EOS = 0


def make_req(rid: str, prompt: list[int], *, max_tokens: int | None = 8, max_model_len: int = 128,
             salt: str | None = None, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                   frozenset({EOS}), max_model_len, parent_id=rid, cache_salt=salt)


def tokens(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


def count_token(request: Request) -> int:
    """Default fake sample: 100, 101, 102, ... per request (never EOS)."""
    return 100 + len(request.output_token_ids)


class Step:
    """One step's SchedulerOutput plus its table of (id, start, num_new, samples), taken before
    update() (which appends tokens and so changes what `ScheduledSeq.samples` reports)."""

    def __init__(self, out: SchedulerOutput) -> None:
        self.out = out
        self.table = [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.seqs]

    def __getattr__(self, name: str):
        return getattr(self.out, name)


class FakeRunner:
    """Drives schedule -> fake forward -> update and checks every step's invariants."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.kv = sched.kv
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, slot) -> prefix it encodes
        self.computed: dict[str, int] = {}  # tokens computed per request id, summed over steps

    def step(self, token_fn: Callable[[Request], int] = count_token) -> Step:
        sched, kv, bs = self.sched, self.kv, self.kv.block_size
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert len({id(s.request) for s in out.seqs}) == len(out.seqs)
        for rid in out.preempted:
            victim = sched.requests[rid]
            assert victim.block_ids == [] and victim.num_computed_tokens == 0
            assert victim.status is RequestStatus.WAITING and victim in sched.waiting
            assert all(s.request is not victim for s in out.seqs)
        apply_block_copies(self.slots, out.block_copies, bs)
        for s in out.seqs:
            r = s.request
            assert r.status is RequestStatus.RUNNING and r in sched.running
            assert s.start == r.num_computed_tokens and s.num_new_tokens > 0
            assert s.start + s.num_new_tokens <= r.num_tokens
            assert len(r.block_ids) * bs >= s.start + s.num_new_tokens
            assert len(set(r.block_ids)) == len(r.block_ids)
            for p in range(s.start):  # attention reads: every computed position holds our prefix
                assert self.slots.get((r.block_ids[p // bs], p % bs)) == tuple(r.token_ids[:p + 1]), (
                    f"{r.request_id}: KV slot for position {p} does not hold its prefix")
        for s in out.seqs:  # forward pass writes the new tokens' K/V
            r = s.request
            for p in range(s.start, s.start + s.num_new_tokens):
                block = r.block_ids[p // bs]
                assert kv.pool.ref_counts[block] == 1, f"write into shared block {block}"
                self.slots[(block, p % bs)] = tuple(r.token_ids[:p + 1])
            self.computed[r.request_id] = self.computed.get(r.request_id, 0) + s.num_new_tokens
        result = Step(out)
        sampled = {s.request.request_id: token_fn(s.request) for s in out.seqs if s.samples}
        sched.update(out, sampled)
        return result

    def drain(self, token_fn: Callable[[Request], int] = count_token, max_steps: int = 500) -> list[Step]:
        outs = []
        while self.sched.has_unfinished():
            assert len(outs) < max_steps, "scheduler made no progress"
            outs.append(self.step(token_fn))
        return outs


def growing_pair() -> tuple[Request, Request]:
    """Two 12-token prompts that each grow to 31 computed tokens (8 blocks of 4): with a
    10-block pool one of them must be preempted."""
    return (make_req("a", tokens(12), max_tokens=20, ignore_eos=True, max_model_len=40),
            make_req("b", tokens(12, 50), max_tokens=20, ignore_eos=True, max_model_len=40))


def step_until_preempted(runner: "FakeRunner"):
    """Step until a step preempts something; return that step's output."""
    while not (out := runner.step()).preempted:
        pass
    return out


def make(num_blocks: int = 64, *, max_num_seqs: int = 8, budget: int = 64,
         enable_prefix_caching: bool = True) -> tuple[Scheduler, KVCacheManager, FakeRunner]:
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=enable_prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), kv)
    return sched, kv, FakeRunner(sched)


def assert_all_free(sched: Scheduler, kv: KVCacheManager) -> None:
    assert not sched.running and not sched.waiting and not sched.requests
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert set(kv.pool.free) == set(range(kv.pool.num_blocks))
    assert all(c == 0 for c in kv.pool.ref_counts)


def seq_table(step: Step) -> list[tuple[str, int, int, bool]]:
    return step.table


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


# --- prefix cache -------------------------------------------------------------------------------

def _computed_a(sched, runner, prompt, rid="a", **kw) -> Request:
    a = make_req(rid, prompt, max_tokens=4, ignore_eos=True, **kw)
    sched.add(a)
    runner.step()
    assert a.num_computed_tokens == len(prompt)
    return a


def test_prefix_hit_for_the_same_full_blocks():
    sched, kv, runner = make()
    shared = tokens(12)
    a = _computed_a(sched, runner, shared + [90, 91])  # 3 full blocks + 2
    assert kv.prefix_hit_tokens == 0
    b = make_req("b", shared + [70, 71, 72, 73, 74], max_tokens=2)
    sched.add(b)
    out = runner.step()
    assert ("b", 12, 5, True) in seq_table(out)
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] not in a.block_ids
    assert [kv.pool.ref_counts[x] for x in a.block_ids[:3]] == [2, 2, 2]
    assert kv.prefix_hit_tokens == 12
    runner.drain()
    assert_all_free(sched, kv)


def test_no_prefix_hit_when_the_first_block_differs():
    sched, kv, runner = make()
    shared = tokens(12)
    _computed_a(sched, runner, shared + [90, 91])
    c = make_req("c", [99] + shared[1:] + [90, 91], max_tokens=2)
    sched.add(c)
    assert ("c", 0, 14, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == 0
    runner.drain()
    assert_all_free(sched, kv)


def test_prefix_hit_stops_at_the_first_differing_block():
    sched, kv, runner = make()
    shared = tokens(12)
    _computed_a(sched, runner, shared + [90, 91])
    d = make_req("d", shared[:4] + [99] + shared[5:] + [90, 91], max_tokens=2)
    sched.add(d)
    assert ("d", 4, 10, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == 4
    runner.drain()
    assert_all_free(sched, kv)


def test_cache_salt_separates_prefixes():
    sched, kv, runner = make()
    prompt = tokens(14)
    _computed_a(sched, runner, prompt, salt="alice")
    for rid, salt, start in (("none", None, 0), ("bob", "bob", 0), ("alice2", "alice", 12)):
        sched.add(make_req(rid, prompt, max_tokens=2, salt=salt))
        assert (rid, start, 14 - start, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == 12
    runner.drain()
    assert_all_free(sched, kv)


def test_hit_is_capped_so_at_least_one_token_is_computed():
    sched, kv, runner = make()
    a = _computed_a(sched, runner, tokens(12))  # exactly 3 full blocks
    b = make_req("b", tokens(12), max_tokens=2)
    sched.add(b)
    assert ("b", 8, 4, True) in seq_table(runner.step())  # 2 blocks hit, the 3rd recomputed
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    c = make_req("c", tokens(8), max_tokens=2)  # a prefix of a, 2 full blocks
    sched.add(c)
    assert ("c", 4, 4, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == 8 + 4
    runner.drain()
    assert_all_free(sched, kv)


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    sched, kv, runner = make(16)
    prompt = tokens(14)
    a = make_req("a", prompt, max_tokens=1)
    sched.add(a)
    runner.drain()
    assert_all_free(sched, kv)  # a's blocks are free ...
    a_hashes = dict(kv.pool.cached)  # hash -> block
    cached_blocks = set(a_hashes.values())
    # ... yet its 3 full blocks are still findable
    assert len(cached_blocks) == 3 and all(kv.pool.block_hash[b] == h for h, b in a_hashes.items())
    # A small unrelated request takes never-used blocks first (LRU), so a's survive.
    sched.add(make_req("x", tokens(6, 200), max_tokens=1))
    runner.drain()
    assert all(kv.pool.cached.get(h) == b for h, b in a_hashes.items())
    b = make_req("b", prompt, max_tokens=2)
    sched.add(b)
    assert ("b", 12, 2, True) in seq_table(runner.step())
    assert set(b.block_ids[:3]) == cached_blocks
    runner.drain()
    # Fill the whole pool with other tokens: every block is reused, the old hashes are gone.
    sched.add(make_req("big", tokens(63, 300), max_tokens=1, max_model_len=64))
    runner.drain()
    assert not (set(kv.pool.cached) & set(a_hashes))
    hits = kv.prefix_hit_tokens
    sched.add(make_req("c", prompt, max_tokens=1))
    assert ("c", 0, 14, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == hits
    runner.drain()
    assert_all_free(sched, kv)


def test_prefix_caching_disabled_gives_no_hits():
    sched, kv, runner = make(enable_prefix_caching=False)
    _computed_a(sched, runner, tokens(14))
    sched.add(make_req("b", tokens(14), max_tokens=1))
    assert ("b", 0, 14, True) in seq_table(runner.step())
    assert kv.prefix_hit_tokens == 0 and not kv.pool.cached
    runner.drain()
    assert_all_free(sched, kv)


# --- n > 1: forking the leader's prompt ---------------------------------------------------------

def _family(prompt: list[int], n: int = 3, **kw) -> list[Request]:
    kw.setdefault("max_tokens", 4)
    kw.setdefault("ignore_eos", True)
    return [make_req("L" if i == 0 else f"L{i}", prompt, **kw) for i in range(n)]


def _by_index(r: Request) -> int:
    """Siblings sample different tokens: 1000 * index + step."""
    index = int(r.request_id[1:]) if r.request_id[:1] == "L" and r.request_id[1:] else 0
    return 1000 * index + 100 + len(r.output_token_ids)


def test_siblings_share_full_blocks_and_copy_the_partial_one():
    sched, kv, runner = make()
    leader, s1, s2 = fam = _family(tokens(10))
    sched.add(leader, [s1, s2])
    assert list(sched.waiting) == [leader]
    out = runner.step(_by_index)
    assert seq_table(out) == [("L", 0, 9, False)] and not out.block_copies
    out = runner.step(_by_index)
    assert seq_table(out) == [("L", 9, 1, True), ("L1", 9, 1, True), ("L2", 9, 1, True)]
    full, partial = leader.block_ids[:2], leader.block_ids[2]
    for sib in (s1, s2):
        assert sib.block_ids[:2] == full and sib.block_ids[2] != partial and len(sib.block_ids) == 3
    assert [kv.pool.ref_counts[b] for b in full] == [3, 3]
    assert kv.pool.ref_counts[partial] == 1
    assert out.block_copies == [(partial, s1.block_ids[2]), (partial, s2.block_ids[2])]
    runner.drain(_by_index)
    assert [r.output_token_ids for r in fam] == [[100, 101, 102, 103], [1100, 1101, 1102, 1103],
                                                 [2100, 2101, 2102, 2103]]
    assert_all_free(sched, kv)


def test_prompt_of_whole_blocks_still_copies_the_partial_block():
    # 8 tokens: the leader computes 7 before forking, so block 2 holds 3 tokens and is copied.
    sched, kv, runner = make()
    leader, s1, s2 = _family(tokens(8))
    sched.add(leader, [s1, s2])
    runner.step(_by_index)
    out = runner.step(_by_index)
    assert len(out.block_copies) == 2 and [kv.pool.ref_counts[leader.block_ids[0]]] == [3]
    runner.drain(_by_index)
    assert_all_free(sched, kv)


def test_no_copy_when_the_forked_prefix_ends_on_a_block_boundary():
    # 9 tokens: the leader computes 8 = 2 full blocks, all shared; each sibling gets a fresh block.
    sched, kv, runner = make()
    leader, s1, s2 = _family(tokens(9))
    sched.add(leader, [s1, s2])
    runner.step(_by_index)
    out = runner.step(_by_index)
    assert out.block_copies == []
    assert seq_table(out) == [("L", 8, 1, True), ("L1", 8, 1, True), ("L2", 8, 1, True)]
    assert s1.block_ids[:2] == s2.block_ids[:2] == leader.block_ids[:2]
    assert len({leader.block_ids[2], s1.block_ids[2], s2.block_ids[2]}) == 3
    assert [kv.pool.ref_counts[b] for b in leader.block_ids[:2]] == [3, 3]
    runner.drain(_by_index)
    assert_all_free(sched, kv)


def test_chunked_leader_holds_back_its_last_prompt_token_for_the_fork():
    sched, kv, runner = make(budget=8)
    leader, s1, s2 = fam = _family(tokens(20))
    sched.add(leader, [s1, s2])
    tables = [seq_table(runner.step(_by_index)) for _ in range(4)]
    assert tables == [
        [("L", 0, 8, False)],
        [("L", 8, 8, False)],
        [("L", 16, 3, False)],
        [("L", 19, 1, True), ("L1", 19, 1, True), ("L2", 19, 1, True)],
    ]
    runner.drain(_by_index)
    assert [len(r.output_token_ids) for r in fam] == [4, 4, 4]
    assert runner.computed == {"L": 19 + 4, "L1": 4, "L2": 4}
    assert_all_free(sched, kv)


def test_one_token_prompt_siblings_are_independent():
    sched, kv, runner = make()
    leader, s1, s2 = fam = _family([42])
    sched.add(leader, [s1, s2])
    assert list(sched.waiting) == fam
    out = runner.step(_by_index)
    assert seq_table(out) == [("L", 0, 1, True), ("L1", 0, 1, True), ("L2", 0, 1, True)]
    assert not out.block_copies
    assert len({r.block_ids[0] for r in fam}) == 3
    runner.drain(_by_index)
    assert_all_free(sched, kv)


def test_leader_with_cached_prompt_forks_without_computing():
    sched, kv, runner = make()
    _computed_a(sched, runner, tokens(9), rid="a")
    leader, s1, s2 = _family(tokens(9))
    sched.add(leader, [s1, s2])
    out = runner.step(_by_index)  # admitted with 8 cached tokens: nothing left before the fork
    assert all(s.request.request_id == "a" for s in out.seqs)
    assert leader.num_computed_tokens == 8 and leader in sched.running
    out = runner.step(_by_index)
    assert [t for t in seq_table(out) if t[0] != "a"] == [("L", 8, 1, True), ("L1", 8, 1, True),
                                                          ("L2", 8, 1, True)]
    runner.drain(_by_index)
    assert_all_free(sched, kv)


def test_aborted_sibling_is_not_forked():
    sched, kv, runner = make()
    leader, s1, s2 = _family(tokens(10))
    sched.add(leader, [s1, s2])
    runner.step(_by_index)
    sched.finish("L1", RequestStatus.FINISHED_ABORTED)
    out = runner.step(_by_index)
    assert [t[0] for t in seq_table(out)] == ["L", "L2"] and len(out.block_copies) == 1
    runner.drain(_by_index)
    assert s1.output_token_ids == [] and s1.block_ids == []
    assert_all_free(sched, kv)


def test_fork_without_a_free_block_falls_back_to_waiting_and_prefix_hits():
    # 3 blocks = one max_model_len (12) sequence; the leader holds all 3 when it forks.
    sched, kv, runner = make(3)
    leader, s1, s2 = fam = _family(tokens(10), max_tokens=2, max_model_len=12)
    sched.add(leader, [s1, s2])
    runner.step(_by_index)
    out = runner.step(_by_index)
    assert seq_table(out) == [("L", 9, 1, True)] and not out.block_copies
    assert {r.request_id for r in sched.waiting} == {"L1", "L2"}
    outs = runner.drain(_by_index)
    starts: dict[str, int] = {}
    for o in outs:
        for rid, start, _, _ in seq_table(o):
            if rid != "L":
                starts.setdefault(rid, start)
    assert starts == {"L1": 8, "L2": 8}  # the leader's two full blocks, found in the cache
    assert [len(r.output_token_ids) for r in fam] == [2, 2, 2]
    assert_all_free(sched, kv)


def test_sibling_seats_count_against_max_num_seqs():
    """max_num_seqs=3 admits a leader with 2 siblings; a 4th request must wait for a seat."""
    sched, kv, runner = make(max_num_seqs=3)
    leader, s1, s2 = _family(tokens(10))
    sched.add(leader, [s1, s2])
    sched.add(make_req("b", tokens(5, 50), max_tokens=3, ignore_eos=True))
    runner.drain(_by_index)  # FakeRunner asserts len(running) <= max_num_seqs on every step
    assert_all_free(sched, kv)
