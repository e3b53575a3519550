"""Host memory after loading and between steps (glibc's allocator; a no-op elsewhere).

glibc serves a large allocation (past its mmap threshold, 128 KiB to start) with a fresh mmap
and returns it on free, so every step's multi-megabyte activations (and the weights dequantized
for a prompt's dense matmuls) come back as new pages that the kernel must fault in and zero:
dequantizing a 3072 x 576 int4 weight took 10.5 ms that way against 2.8 ms with the memory
reused. Raising the mmap and trim thresholds (to 64 MiB: a 2,048-token step's largest
activation is 25 MiB) keeps such blocks on the heap for the next step; free memory beyond 64 MiB
at the heap's top still goes back.

Loading is the opposite case: its transients (unpacked 4-bit codes, fp32 rows) are freed amid
long-lived tensors. `return_large_blocks` (before loading) keeps them off the heap;
`settle_after_load` returns whatever free pages the heap still holds (malloc_trim, ~15 ms; it
held ~340 MiB after loading the embedded model), then sets the thresholds for the steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger("miaotui")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 2**20
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 64 * 2**20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def return_large_blocks() -> bool:
    """For loading: serve every block over 1 MiB by mmap, so a freed transient goes straight back
    to the kernel (glibc's dynamic threshold would otherwise move up to 32 MiB after the first such
    free and leave the transients fragmenting the heap: load peak 720 -> 545 MiB on the embedded
    model). True when set."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD) == 1


def settle_after_load() -> bool:
    """Return the loader's freed pages to the kernel, then keep later steps' freed blocks on the
    heap (raise the mmap and trim thresholds). True when both were applied."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.debug("mallopt refused the allocator thresholds; large tensors keep fresh pages")
    return ok
