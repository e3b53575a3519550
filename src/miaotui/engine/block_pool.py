"""KV block pool: ref counts, the free LRU queue, and the prefix-cache hash -> block map.

Invariants:
- A block is either free (ref count 0, in `free`, oldest first) or held (ref count = number of
  requests whose tables list it).
- A full block whose K/V is computed may carry a hash chained over every token before it (and
  the request's cache salt). Free blocks keep their hash and stay findable through `cached`
  until they are reused, so freeing never throws computed work away; reuse takes the block that
  was freed longest ago (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


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
    """Blocks `first` .. num_blocks - 1 are pooled; ids below `first` are reserved (a window
    group's placeholder) and are never free, allocated or ref-counted."""

    def __init__(self, num_blocks: int, first: int = 0) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(first, num_blocks))
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
