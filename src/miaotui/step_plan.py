"""What one engine step computes: the scheduler's output, which the runner consumes.

It lives beneath both engine/ (which builds it) and runner/ (which executes it), so neither
imports the other (DESIGN.md: Layering).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.request import Request

# The block id a window group's table holds for a released block (engine/window_kv.py): block 0
# of every window group, never allocated; the window mask never lets attention read it.
PLACEHOLDER = 0


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
    # (src, dst) KV block copies the runner makes before the forward pass (forks).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # The same per window group (sliding-window layers), in the KV manager's group order.
    window_block_copies: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)
