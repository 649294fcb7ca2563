"""Process-level tuning of the host for CPU inference (``softprompt serve`` applies it; a library user of the
engine decides for their own process).

glibc's malloc serves allocations above a dynamic threshold (128 KiB, growing up to 32 MiB) with fresh ``mmap``
pages and returns them to the kernel on free, so every step's large activations (a prefill's ``[1344, 3072]``
fp32 MLP output is 16 MiB) page-fault again each time they are touched. Measured here on a prefill step of 64 rows
x 21 tokens of SmolLM2-135M: 1.42 s with glibc's defaults, 1.12 s with the thresholds below. vLLM's CPU build gets
the same effect by preloading tcmalloc; we set glibc's own knobs (``mallopt(3)``), which needs no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``), bytes.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Keep up to this much freed memory at the top of the heap instead of returning it to the kernel, bytes.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (allocations up to 32 MiB are then reused from the
    heap instead of being mapped and unmapped each step). Returns False, changing nothing, where glibc's
    ``mallopt`` is not available (another libc or OS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        log.info("mallopt refused the thresholds; keeping the C library's defaults")
    return ok
