"""Memory tuning for a process that is ours alone (the `mtseg` CLI, the Slicer module's worker process).

Two process-wide costs dominate the stages around the network on large volumes, both page faults
on fresh memory:

- glibc serves blocks of 32 MB or more with fresh mmap pages and returns freed heap tops to the
  kernel, so every large temporary (activations in the sliding window; index and weight tables,
  masks and component maps after it) pays for ~10⁴ page faults of freshly zeroed memory;
- numpy (≥ 1.22) asks for transparent huge pages on every array of 4 MB or more. With the kernel's
  default ``defrag=madvise`` each such fault may compact memory synchronously before it zeroes a
  2 MB page: on the 512×512×300 CT this was most of the uncertainty resampling (2.6 s → 0.7 s)
  and of the largest-component step (2.3 s → 0.9 s) on this machine, as system time.

``allow_malloc_tuning`` turns the huge-page request off and lets ``reuse_freed_memory`` raise
glibc's thresholds while a prediction runs (the same effect as running under jemalloc or tcmalloc,
without asking the user to preload one). Both stay off by default: they change the host process for
good (glibc's adaptive thresholds cannot be restored), so inside Slicer's own process nothing is
touched; Slicer predicts in a worker process, which turns them on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_STATE = {"allowed": False, "depth": 0}


def allow_malloc_tuning(allowed: bool = True) -> None:
    """Let this process's predictions tune its memory (see the module docstring); for a process that is ours alone."""
    _STATE["allowed"] = allowed
    # numpy's private switch (numpy 1.22+; ``NUMPY_MADVISE_HUGEPAGE=0`` does the same before numpy is imported)
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or getattr(np.core, "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(not allowed)


def _glibc():
    """glibc's malloc controls, or None (other C libraries, macOS, Windows)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed blocks in the heap for reuse while the body runs, then hand the free memory back.

    Re-entrant: only the outermost level changes the thresholds (the sliding window's own use inside
    a whole prediction must not trim the heap halfway). Afterwards the thresholds go back to the values
    glibc's own adjustment settles on (32 MB / 64 MB) and malloc_trim returns the free memory. Only
    where the process owner allowed it (``allow_malloc_tuning``).
    """
    libc = _glibc() if enabled and _STATE["allowed"] and _STATE["depth"] == 0 else None
    _STATE["depth"] += 1
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield
    finally:
        _STATE["depth"] -= 1
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)
