"""Scheduler + KV cache manager on CPU, without a model (tests/scheduler_harness.py plays the
forward pass): prefix-cache hits and n > 1 forks of the leader's prompt."""

from __future__ import annotations

from miaotui.request import Request, RequestStatus
from tests.scheduler_harness import assert_all_free, make, make_req, seq_table, tokens


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
