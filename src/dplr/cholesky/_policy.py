"""How ``method="auto"`` and the BLAS thread setting are chosen for Cholesky modifications.

The thresholds are measurements, not theory: see ``benchmarks/cholesky.py``
(the grid of N x M) and ``docs/cholesky.md`` (the table they came from).
"""

from __future__ import annotations

from .._runtime import tuning as _t


def choose_method(n: int, m: int, batch: int, torch: bool) -> str:
    """``"rank1"``, ``"blocked"`` or ``"refactor"`` for an N x N factor, rank M, batch size."""
    if torch:
        return "refactor" if 2 * m >= n or n <= _t.AUTO_TORCH_REFACTOR_MAX_ORDER else "blocked"
    if m <= _t.AUTO_RANK1_MAX_RANK or (batch > 1 and m <= _t.AUTO_RANK1_BATCHED_MAX_RANK):
        return "rank1"
    if n <= _t.AUTO_SMALL_ORDER:  # a new factorisation costs ~0.15 ms here
        return "refactor" if m >= _t.AUTO_SMALL_REFACTOR_MIN_RANK else "rank1"
    if m <= _t.AUTO_RANK1_MEDIUM_MAX_RANK and n <= _t.AUTO_RANK1_MEDIUM_MAX_ORDER:
        return "rank1"
    if m >= n and n <= _t.AUTO_REFACTOR_WIDE_MAX_ORDER:
        return "refactor"
    return "blocked"


def blas_thread_count(n: int) -> int:
    """BLAS threads for the ``blocked`` and ``refactor`` paths of an N x N factor.

    1 (the whole call in one thread) below
    :data:`dplr._runtime.tuning.THREADED_BLAS_MIN_ORDER`; 0 (the library's,
    or the caller's threadpoolctl, setting) from there on.  The (N - e) x
    (c + M) panel products of a large factor gain from threads: on an idle
    2-core machine N = 3000, M = 32 measured 29-35 ms against 40-41 ms in one
    thread, and N = 4000, M = 64 61 ms against 92 ms.  (When other processes
    hold every core, OpenBLAS's spinning threads can make them much slower;
    limit BLAS threads with threadpoolctl or ``OPENBLAS_NUM_THREADS`` there.)
    Below N = 1000 the panels are small and one thread is as fast.
    """
    return 0 if n >= _t.THREADED_BLAS_MIN_ORDER else 1
