"""Token-budget scheduler: no prefill/decode phases, only `num_computed_tokens` per request.

Each step: running requests first (their next token or next prompt chunk), then waiting
requests in arrival order (each starting after its longest cached prefix), until
`max_num_batched_tokens` or `max_num_seqs` is reached. When blocks run out, the newest running
request is preempted (blocks freed, recomputed later, mostly from the prefix cache).

n > 1: only the first sequence (the leader) computes the prompt, up to its last token; then its
siblings fork its blocks (full blocks shared, the partial one copied) and each computes the
last prompt token itself and samples on its own.
"""

from __future__ import annotations

from collections import deque

from miaotui.config import SchedulerConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.request import Request, RequestStatus
from miaotui.step_plan import ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request, siblings: list[Request] | None = None) -> None:
        """Queue a request; `siblings` (n > 1) fork from it once it has computed its prompt."""
        self.requests[request.request_id] = request
        self.waiting.append(request)
        siblings = siblings or []
        for sib in siblings:
            self.requests[sib.request_id] = sib
        if request.num_tokens < 2:
            self.waiting.extend(siblings)  # no prompt K/V to share: independent requests
        else:
            request.fork_siblings = list(siblings)

    def add_forked(self, request: Request) -> None:
        """Queue a request that already holds forked blocks (a new beam): it runs next step.
        One without blocks (the fork found none free) waits and recomputes its prefix."""
        self.requests[request.request_id] = request
        if request.block_ids:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        else:
            request.num_computed_tokens = 0
            self.waiting.appendleft(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _fork_siblings(self, leader: Request) -> None:
        siblings, leader.fork_siblings = leader.fork_siblings, []
        for sib in siblings:
            if sib.status.finished:
                continue
            if self.kv.fork(leader, sib):
                sib.status = RequestStatus.RUNNING
                self.running.append(sib)
            else:  # no block for the copy: compute the prompt on its own (prefix cache helps)
                self.waiting.appendleft(sib)

    def _chunk(self, request: Request, budget: int) -> int:
        end = request.num_tokens - (1 if request.fork_siblings else 0)
        return min(end - request.num_computed_tokens, budget)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        # Running requests, oldest first. Siblings forked here join the end of the list and are
        # scheduled in this same step; preemption always takes the list's last element.
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.fork_siblings and request.num_computed_tokens == request.num_tokens - 1:
                self._fork_siblings(request)
            num_new = self._chunk(request, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it preempted itself: it was the newest, nothing after it runs
            out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, num_new))
            budget -= num_new
            i += 1
        while self.waiting and budget > 0 and not out.preempted:
            request = self.waiting[0]
            # Seats: running sequences plus the siblings they will fork (reserved at admission).
            taken = len(self.running) + sum(len(r.fork_siblings) for r in self.running)
            if taken + 1 + len(request.fork_siblings) > self.config.max_num_seqs:
                break
            # A request scoring its prompt computes every prompt position itself (its own full
            # blocks still enter the prefix cache for others), as vLLM does.
            use_cache = not request.block_ids and not request.needs_prompt_logprobs
            hits = self.kv.find_cached_prefix(request) if use_cache else []
            computed = len(hits) * self.kv.block_size if hits else request.num_computed_tokens
            end = request.num_tokens - (1 if request.fork_siblings else 0)
            num_new = min(end - computed, budget)
            if not self.kv.can_admit(request, hits, num_new):
                break
            self.waiting.popleft()
            if not request.block_ids:
                self.kv.admit(request, hits)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                self.kv.allocate_slots(request, num_new)
                out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, num_new))
                budget -= num_new
        out.block_copies = self.kv.take_copies()
        out.window_block_copies = self.kv.take_window_copies()
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish on EOS/length. Returns requests
        that received a token this step."""
        updated: list[Request] = []
        for seq in out.seqs:
            request = seq.request
            samples = seq.samples
            request.num_computed_tokens += seq.num_new_tokens
            self.kv.cache_computed_blocks(request)
            if not samples or request.is_beam:
                continue
            request.append_output_token(sampled[request.request_id])
            request.check_token_stop()
            if request.status.finished:
                self._remove(request)
            updated.append(request)
        return updated

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Finish a request from outside the step (abort, stop string); its blocks are freed now."""
        request = self.requests.pop(request_id, None)
        if request is None or request.status.finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        if request.block_ids:
            self.kv.free(request)
        if stop_reason is not None:
            request.stop_reason = stop_reason

    def _remove(self, request: Request) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        self.kv.free(request)
