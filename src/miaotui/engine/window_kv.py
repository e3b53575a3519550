"""The KV blocks of one sliding-window layer group: a pool of its own, and per request a block
table that lets go of the blocks no future query can attend.

A layer with window w lets the query at position p attend keys in (p - w, p]. Once a request
has computed c tokens every later query sits at a position >= c, so block i (positions
[i * bs, (i + 1) * bs)) is never read again once (i + 1) * bs <= c - w: it is released and its
table entry becomes PLACEHOLDER. Attention still gathers that entry (tables stay positional, one
entry per block of the sequence, exactly like the full-attention group's), but the window mask
never lets a query read it; the runner zeroes block 0 once, so the masked read is finite.
A request then holds at most ceil((w + chunk) / bs) + 1 blocks here,
however long it grows (runner/kv_layout.py sizes the pool by that bound).

Invariants of a request's table in this group:
- len(table) == len(request.block_ids); PLACEHOLDER entries form a prefix of it, and every other
  entry is a block of this pool that the request holds a reference to.
- PLACEHOLDER (block 0) is never in the free queue, never allocated, never ref-counted.
- Prefix cache: full blocks are registered under the same chained hashes as the full group's.
  A hit of k blocks is exact only if this group still finds blocks first_needed(k * bs) .. k - 1
  (the window before the first computed token); `usable_hits` finds the longest such k.
"""

from __future__ import annotations

from miaotui.engine.block_pool import BlockPool
from miaotui.step_plan import PLACEHOLDER

__all__ = ["PLACEHOLDER", "WindowGroup"]


class WindowGroup:
    """Block accounting of the layers with one sliding window, beside the full group's."""

    def __init__(self, window: int, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a sliding-window KV group needs at least 2 blocks (one is the placeholder), got {num_blocks}")
        self.window = window
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, first=PLACEHOLDER + 1)
        self.pending_copies: list[tuple[int, int]] = []

    def first_needed(self, num_computed: int) -> int:
        """Index of the first block a query at position >= num_computed may still attend."""
        return max(0, (num_computed - self.window) // self.block_size)

    def usable_hits(self, hashes: list[bytes], max_blocks: int) -> int:
        """The longest k <= max_blocks such that blocks first_needed(k * bs) .. k - 1 are all cached
        here (hashes[i] keys block i). k = 0 (no hit) is always usable."""
        cached = self.pool.cached
        last_missing = -1  # the last index < k whose block this group lacks
        best = 0
        for k in range(1, max_blocks + 1):
            if hashes[k - 1] not in cached:
                last_missing = k - 1
            if last_missing < self.first_needed(k * self.block_size):
                best = k
        return best

    def hit_table(self, hashes: list[bytes], k: int) -> list[int]:
        """The table of a k-block prefix hit (usable_hits said yes): placeholders, then the
        window's cached blocks."""
        first = self.first_needed(k * self.block_size)
        return [PLACEHOLDER] * first + [self.pool.cached[h] for h in hashes[first:k]]

    def held(self, table: list[int]) -> list[int]:
        return [b for b in table if b != PLACEHOLDER]

    def release_behind(self, table: list[int], num_computed: int) -> None:
        """Release the blocks no query at position >= num_computed can attend (newest first, so
        the free queue reuses the oldest first), turning their entries into placeholders."""
        freed = []
        i = min(self.first_needed(num_computed), len(table)) - 1
        while i >= 0 and table[i] != PLACEHOLDER:
            freed.append(table[i])
            table[i] = PLACEHOLDER
            i -= 1
        if freed:
            self.pool.release(freed)

    def fork_table(self, src: list[int], num_computed: int) -> list[int]:
        """dst's table for a fork at num_computed tokens: full blocks shared, the partial last block
        copied (queued). The caller has checked a block is free for the copy."""
        num_full = num_computed // self.block_size
        table = list(src[:num_full])
        self.pool.touch(self.held(table))
        if num_computed % self.block_size:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((src[num_full], copy))
            table.append(copy)
        return table

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
