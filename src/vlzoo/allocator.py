"""The C allocator's settings for training on CPU (issue 19, docs/performance.md).

glibc's ``malloc`` serves a tensor buffer above its mmap threshold with a fresh ``mmap`` and gives
it back with ``munmap`` when freed; it also returns free memory at the top of its heap to the
system (``trim``).  A training step frees and allocates the same activation buffers every step,
so each step takes the same pages back from the kernel again: page faults and zeroing, a cost
proportional to the step's memory that depends on the order of allocations.  Lightning's
automatic optimization runs the forward inside ``optimizer.step(closure)`` and zeroes the
gradients between forward and backward; in that order the churn cost 2-4 % of a tiny Shapes
step against a plain loop (``benchmarks/bench_overhead.py --closure-order``), with no Lightning
in either.

:func:`keep_freed_memory` sets glibc (``mallopt``) to serve buffers up to 32 MB from its heap, to
keep up to 1 GB of freed memory at the heap's top instead of trimming it, and to grow the heap
in 64 MB steps: freed buffers are reused, and the process keeps its peak memory instead of
giving it back between steps.  ``vlzoo fit`` calls it (set ``VLZOO_MALLOC=system`` to keep
glibc's defaults).  Elsewhere (another C library, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "MALLOC_SETTINGS", "MALLOC_ENV"]

#: environment variable: ``system`` leaves the C allocator's settings alone
MALLOC_ENV = "VLZOO_MALLOC"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: what :func:`keep_freed_memory` sets: (name, mallopt parameter, value in bytes)
MALLOC_SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # glibc's largest on 64-bit
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 1024 * 1024 * 1024),
    ("M_TOP_PAD", _M_TOP_PAD, 64 * 1024 * 1024),
)

_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc (not musl), whose mallopt takes these parameters
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> dict[str, int]:
    """Set glibc's allocator as described in the module docstring, once per process; returns the
    settings applied (empty when ``VLZOO_MALLOC=system``, on a C library other than glibc, or when
    glibc refused one: then the ones before it stay set)."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    applied: dict[str, int] = {}
    libc = None if os.environ.get(MALLOC_ENV, "").strip().lower() == "system" else _glibc()
    if libc is not None:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        for name, param, value in MALLOC_SETTINGS:
            if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
                break
            applied[name] = value
    _applied = applied
    return dict(applied)
