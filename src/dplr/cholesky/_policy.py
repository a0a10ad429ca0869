"""How ``method="auto"`` and the BLAS thread setting are chosen for Cholesky updates.

The thresholds are measurements, not theory: see ``benchmarks/cholesky.py``
(the grid of N x M) and ``docs/cholesky.md`` (the table they came from).
"""

from __future__ import annotations

#: Rows per chunk of the blocked path's Schur recursion and panel products
#: (32 to 64 measured within noise at N = 3000, M = 32; 96 slower).
CHUNK = 64


def choose_method(n: int, m: int, batch: int, torch: bool) -> str:
    """``"rank1"``, ``"blocked"`` or ``"refactor"`` for an N x N factor, rank M, batch size."""
    if torch:
        return "refactor" if 2 * m >= n or n <= 64 else "blocked"
    if m <= 2 or (batch > 1 and m <= 8):
        return "rank1"
    if n <= 128:  # a new factorisation costs ~0.15 ms here: beats M sweeps from M ~ 8
        return "refactor" if m >= 8 else "rank1"
    if m <= 4 and n <= 1000:
        return "rank1"
    if 2 * m >= n and n <= 500:  # measured tie with "blocked" at N = 500, M = 256
        return "refactor"
    return "blocked"


def panel_threads(n: int, m: int, batch: int) -> int:
    """BLAS threads for the panel products of the blocked path (0: library default).

    Small per-chunk operations always run in one thread.  The (N - e) x (c + M)
    panel products of a large factor run in the library's (or the caller's
    threadpoolctl) setting: on an idle 2-core machine that measured N = 3000,
    M = 32 at 29-35 ms against 40-41 ms in one thread, and N = 4000, M = 64 at
    61 ms against 92 ms.  (When other processes hold every core, OpenBLAS's
    spinning threads can make them much slower; limit BLAS threads with
    threadpoolctl or ``OPENBLAS_NUM_THREADS`` there.)  Below N = 1000 the panels
    are small and one thread is as fast.
    """
    return 0 if n >= 1000 else 1
