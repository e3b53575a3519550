"""The scheduler tests' harness: a fake runner that plays the forward pass.

The fake runner keeps, for every KV slot, the token prefix whose K/V it would hold, applies the
scheduler's block copies, and checks on every step that each scheduled sequence finds its own
computed prefix in its blocks and writes only into blocks nobody else holds. So a wrong prefix
hit, a missed copy or a shared block written in place fails here, not only as wrong text later.
"""


from __future__ import annotations

from collections.abc import Callable

from miaotui.config import SchedulerConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.scheduler import Scheduler
from miaotui.step_plan import SchedulerOutput
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


def step_until_preempted(runner: FakeRunner) -> Step:
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
