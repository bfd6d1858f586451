"""Keep the host memory that freed CPU tensors release inside the process, for the next step to reuse.

glibc's malloc serves every request above its mmap threshold (128 KiB at start, raised adaptively up to
32 MiB) with a fresh mapping from the kernel and unmaps it on free, and hands the heap's free top back to
the kernel once it exceeds the trim threshold. A training step on the CPU allocates and frees hundreds of
megabytes of short-lived tensors (activations, their gradients, [rows, positions, vocab] logits chunks), so
every step pays again for pages the last one gave back: the kernel zero-fills each on first touch, one minor
page fault per 4 KiB. In the bench's C0 step loop (README, Performance) an update took 29,000-114,000 such
faults (110-450 MiB zero-filled); with both thresholds raised, 1 to 4,100 (medians of 7 rounds).

    retain_freed_memory()   # once, at the start of a CPU-heavy process (experiments.run and .bench do)

The cost: the process keeps its high-water mark of heap memory resident between steps instead of returning it.
Freed blocks must first coalesce before a request of the same size fits again (PyTorch asks for 64-byte aligned
blocks, a little larger than the ones it frees), so the heap can grow to a few steps' worth of temporaries
before it stops growing (tests/test_host_memory.py bounds it); in the C0 loop the resident memory settled at
1,333 MiB, against 1,250-1,349 MiB with glibc's defaults. Tensors on a GPU are not affected (their caching
allocator keeps its memory already). Outside glibc (macOS, Windows, musl) this does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30  # requests up to 1 GiB come from the heap and are reused after free
FALLBACK_MMAP_THRESHOLD_BYTES = 32 << 20  # if a glibc refuses 1 GiB: the most it adapts to by itself (64-bit)
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # keep up to 2 GiB of free heap top (the largest an int parameter holds)


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring). True if glibc took both settings;
    False (and nothing changed) where the C library is not glibc."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 or \
        mallopt(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD_BYTES) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mmap_set and trim_set


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (whose malloc `retain_freed_memory` tunes)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False
