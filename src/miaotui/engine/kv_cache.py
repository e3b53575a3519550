"""Per-request KV block accounting over the block pools of the model's KV groups.

The full-attention group (every layer of most models) is `pool`, and `request.block_ids` is its
table. A model that mixes sliding-window and full-attention layers also has one WindowGroup per
window (engine/window_kv.py), with `request.window_block_ids[g]` its table in group g: those
tables release the blocks behind the window, so the sliding layers' memory per request stops
growing at about window + chunk tokens. Every operation here acts on all groups at once: a
request is admitted, grown, forked and freed in every group or in none.

Invariants:
- The blocks of a request are in `pool` held once per listing (see block_pool.py); every table
  of a request has one entry per block of its computed and allocated tokens.
- The last, partial block of a request is never shared; forking a request copies it.
- A prefix hit is taken only as long as every group holds exact K/V for it: the full group its
  whole prefix, a window group the window before its end.
"""

from __future__ import annotations

from miaotui.engine.block_pool import BlockPool, hash_block
from miaotui.engine.window_kv import PLACEHOLDER, WindowGroup
from miaotui.request import Request

__all__ = ["BlockPool", "KVCacheManager", "hash_block"]


class KVCacheManager:
    """Gives requests the blocks their next tokens need; takes them back when they stop.

    `windows`: (window, num_blocks) of each sliding-window group beside the full one; empty for
    a model whose layers all attend alike (then nothing here touches a window group)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: tuple[tuple[int, int], ...] = ()) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.windows = [WindowGroup(w, n, block_size) for w, n in windows]
        self.enable_prefix_caching = enable_prefix_caching
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the runner
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_full: int) -> list[bytes]:
        """Hashes of the request's first `num_full` full blocks (extended lazily, kept on it)."""
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(request.token_ids[i * bs:(i + 1) * bs]),
                                     request.cache_salt))
        return hashes[:num_full]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Full-group blocks of the longest cached prefix of a request that has none yet, cut to
        what every window group can serve too. At least one token is always left to compute,
        since its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        hashes = self._block_hashes(request, max_blocks)
        for h in hashes:
            block = self.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        for group in self.windows:
            if not hits:
                break
            del hits[group.usable_hits(hashes, len(hits)):]
        return hits

    def _window_tables(self, request: Request, num_hits: int) -> list[list[int]]:
        hashes = request.block_hashes[:num_hits]
        return [g.hit_table(hashes, num_hits) for g in self.windows]

    def can_admit(self, request: Request, hits: list[int], num_new_tokens: int) -> bool:
        """Whether taking `hits` and then allocating for `num_new_tokens` more fits in every group."""
        need = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        hits_now_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if need > self.pool.num_free - hits_now_free:
            return False
        for group, table in zip(self.windows, self._window_tables(request, len(hits))):
            now_free = sum(1 for b in group.held(table) if group.pool.ref_counts[b] == 0)
            if need > group.pool.num_free - now_free:
                return False
        return True

    def admit(self, request: Request, hits: list[int]) -> None:
        """Give a waiting request its cached prefix; it starts computing after it."""
        self.pool.touch(hits)
        request.block_ids = list(hits)
        request.window_block_ids = self._window_tables(request, len(hits))
        for group, table in zip(self.windows, request.window_block_ids):
            group.pool.touch(group.held(table))
        request.num_cached_blocks = len(hits)
        request.num_computed_tokens = len(hits) * self.block_size
        self.prefix_hit_tokens += request.num_computed_tokens
        self.prefix_query_tokens += request.num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Ensure blocks for `num_computed_tokens + num_new_tokens`; False (nothing taken) if short.
        Window groups first release what no query from `num_computed_tokens` on can attend."""
        computed = request.num_computed_tokens
        tables = request.window_block_ids
        if not tables and not request.block_ids and self.windows:
            tables = request.window_block_ids = [[] for _ in self.windows]  # a request never admitted
        if len(tables) != len(self.windows):
            raise RuntimeError(f"request {request.request_id} has {len(tables)} window block tables for "
                               f"{len(self.windows)} window groups: it was not admitted or forked by this manager")
        for group, table in zip(self.windows, tables):
            group.release_behind(table, computed)
        need = self.blocks_needed(computed + num_new_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free or any(need > g.pool.num_free for g in self.windows):
            return False
        request.block_ids.extend(self.pool.allocate(need))
        for group, table in zip(self.windows, tables):
            table.extend(group.pool.allocate(need))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Make the request's newly completed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_cached_blocks:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(request.num_cached_blocks, num_full):
            self.pool.register(request.block_ids[i], hashes[i])
        # A window entry is released only after its block was computed, and so registered by
        # an earlier call; placeholders are skipped all the same (they hold no one's K/V).
        for group, table in zip(self.windows, request.window_block_ids):
            for i in range(request.num_cached_blocks, num_full):
                if table[i] != PLACEHOLDER:
                    group.pool.register(table[i], hashes[i])
        request.num_cached_blocks = num_full

    def fork(self, src: Request, dst: Request) -> bool:
        """Give `dst` the K/V of `src`'s computed tokens: full blocks shared, the partial last
        block copied (the copy is queued for the runner). False, with nothing taken, if some
        group has no block free for the copy."""
        n = src.num_computed_tokens
        num_full = n // self.block_size
        partial = n % self.block_size != 0
        if partial and (self.pool.num_free < 1 or any(g.pool.num_free < 1 for g in self.windows)):
            return False
        shared = src.block_ids[:num_full]
        self.pool.touch(shared)
        dst.block_ids = list(shared)
        if partial:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((src.block_ids[num_full], copy))
            dst.block_ids.append(copy)
        dst.window_block_ids = [g.fork_table(t, n) for g, t in zip(self.windows, src.window_block_ids)]
        dst.num_computed_tokens = n
        dst.num_cached_blocks = min(src.num_cached_blocks, num_full)
        dst.block_hashes = list(src.block_hashes[:num_full])
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def take_window_copies(self) -> list[list[tuple[int, int]]]:
        """Each window group's queued fork copies (src, dst), in group order; [] without groups."""
        return [g.take_copies() for g in self.windows]

    def window_held_blocks(self, request: Request) -> list[int]:
        """How many blocks the request holds in each window group (for tests and stats)."""
        return [len(g.held(t)) for g, t in zip(self.windows, request.window_block_ids)]

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        for group, table in zip(self.windows, request.window_block_ids):
            group.pool.release(group.held(table))
        request.block_ids = []
        request.window_block_ids = []
        request.num_cached_blocks = 0
