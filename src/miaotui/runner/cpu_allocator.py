"""Host memory after loading and between steps (glibc's allocator; a no-op elsewhere).

glibc serves a large allocation (past its mmap threshold, 128 KiB to start) with a fresh mmap
and returns it on free, so every step's multi-megabyte activations (and the weights dequantized
for a prompt's dense matmuls) come back as new pages that the kernel must fault in and zero:
dequantizing a 3072 x 576 int4 weight took 10.5 ms that way against 2.8 ms with the memory
reused. Raising the mmap and trim thresholds keeps such blocks on the heap for the next step.
Memory stays bounded by the largest step's working set, which the process needs anyway.

Loading is the opposite case: its transients (unpacked 4-bit codes, fp32 rows) are freed amid
long-lived tensors, and the fragmented heap kept ~340 MiB of free pages resident after loading
the embedded model. `settle_after_load` hands those back (malloc_trim, ~15 ms), then sets the
thresholds for the steps to come.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger("miaotui")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 1024 * 2**20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- musl has neither
    except (OSError, AttributeError):
        return None
    return libc


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
