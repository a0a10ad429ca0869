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
    panel products ran up to 1.8x faster with two threads on an idle 2-core
    machine but many times slower when other processes held the cores
    (OpenBLAS threads spin), so one thread is the default.
    """
    return 1
