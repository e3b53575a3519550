"""KV block pool with prefix caching, and per-request block accounting.

Invariants:
- A block is either free (ref count 0, in `free`, oldest first) or held (ref count = number of
  requests whose `block_ids` list it).
- A full block whose K/V is computed may carry a hash chained over every token before it (and
  the request's cache salt). Free blocks keep their hash and stay findable through `cached`
  until they are reused, so freeing never throws computed work away; reuse takes the block that
  was freed longest ago (LRU).
- The last, partial block of a request is never shared; forking a request copies it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from miaotui.request import Request


def hash_block(parent: bytes | None, tokens: tuple[int, ...], salt: str | None) -> bytes:
    """Chained block key: BLAKE2b over the previous block's key, the salt and this block's tokens.

    A cryptographic hash, so equal keys mean equal salted prefixes: no client can craft a prompt
    whose blocks take another's K/V (Python's 64-bit `hash()` of a tuple, used before, can be
    made to collide). Each part is framed (presence byte, length) so no two inputs concatenate
    to the same bytes."""
    h = hashlib.blake2b(digest_size=32)
    h.update(b"\x00" if parent is None else b"\x01" + parent)
    if salt is None:
        h.update(b"\x00")
    else:
        encoded = salt.encode("utf-8", "surrogatepass")
        h.update(b"\x01" + len(encoded).to_bytes(8, "little") + encoded)
    h.update(array("q", tokens).tobytes())  # fixed width: token ids are < 2**63
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block key -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None

    def touch(self, blocks: list[int]) -> None:
        """Take another reference to blocks (cache hits, forks); free ones leave the free queue."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        # Reversed, so a chain's tail is evicted before its head: the head is the likelier hit.
        for b in reversed(blocks):
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None

    def register(self, block: int, h: bytes) -> None:
        if self.block_hash[block] is None:
            self.block_hash[block] = h
            self.cached.setdefault(h, block)


class KVCacheManager:
    """Gives requests the blocks their next tokens need; takes them back when they stop."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
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
        """Blocks holding the longest cached prefix of a request that has none yet. At least one
        token is always left to compute, since its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self._block_hashes(request, max_blocks):
            block = self.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, request: Request, hits: list[int], num_new_tokens: int) -> bool:
        """Whether taking `hits` and then allocating for `num_new_tokens` more fits in the pool."""
        need = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        hits_now_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        return need <= self.pool.num_free - hits_now_free

    def admit(self, request: Request, hits: list[int]) -> None:
        """Give a waiting request its cached prefix; it starts computing after it."""
        self.pool.touch(hits)
        request.block_ids = list(hits)
        request.num_cached_blocks = len(hits)
        request.num_computed_tokens = len(hits) * self.block_size
        self.prefix_hit_tokens += request.num_computed_tokens
        self.prefix_query_tokens += request.num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Ensure blocks for `num_computed_tokens + num_new_tokens`; False (nothing taken) if short."""
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        request.block_ids.extend(self.pool.allocate(need))
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
        request.num_cached_blocks = num_full

    def fork(self, src: Request, dst: Request) -> bool:
        """Give `dst` the K/V of `src`'s computed tokens: full blocks shared, the partial last
        block copied (the copy is queued for the runner). False, with nothing taken, if no block
        is free for the copy."""
        n = src.num_computed_tokens
        num_full = n // self.block_size
        partial = n % self.block_size != 0
        if partial and self.pool.num_free < 1:
            return False
        shared = src.block_ids[:num_full]
        self.pool.touch(shared)
        dst.block_ids = list(shared)
        if partial:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((src.block_ids[num_full], copy))
            dst.block_ids.append(copy)
        dst.num_computed_tokens = n
        dst.num_cached_blocks = min(src.num_cached_blocks, num_full)
        dst.block_hashes = list(src.block_hashes[:num_full])
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0
