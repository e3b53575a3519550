"""Token-budget scheduler: no prefill/decode phases, only `num_computed_tokens` per request.

Each step: running requests first (their next token or next prompt chunk), then waiting
requests in arrival order, until `max_num_batched_tokens` or `max_num_seqs` is reached. When
blocks run out, the newest running request is preempted (blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from miaotui.config import SchedulerConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    """One request's work in a step: tokens [start, start + num_new_tokens) of `request.token_ids`."""

    request: Request
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]
                if victim.request_id in scheduled:
                    raise RuntimeError("KV cache too small for the scheduled batch")
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, num_new))
            scheduled.add(request.request_id)
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, num_new))
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish on EOS/length. Returns requests
        that received a token this step."""
        updated: list[Request] = []
        for seq in out.seqs:
            request = seq.request
            samples = seq.samples
            request.num_computed_tokens += seq.num_new_tokens
            if not samples:
                continue
            request.append_output_token(sampled[request.request_id])
            request.check_token_stop()
            if request.status.finished:
                self._remove(request)
            updated.append(request)
        return updated

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Finish a request from outside the step (abort, stop string); its blocks are freed now."""
        request = self.requests.get(request_id)
        if request is None or request.status.finished:
            return
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
            request.status = status
            self.requests.pop(request_id)
            if request.block_ids:
                self.kv.free(request)
        else:
            request.status = status
            self._remove(request)
        request.stop_reason = stop_reason if stop_reason is not None else request.stop_reason

    def _remove(self, request: Request) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        self.kv.free(request)
