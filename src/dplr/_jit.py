"""Compiled (Numba) loops behind the NumPy backend of the core kernels.

The triangular solve with every c x c diagonal block of a chunked matrix is
a stack of small independent problems.  LAPACK's ``trsm`` called once per
block is slow at this size (about 13 GFLOP/s in float64 here, one thread, and
it holds the GIL); :func:`solve_lower_stack` runs all blocks in parallel in
compiled code.  It takes C-contiguous float32/float64 arrays (the caller
ensures that), is compiled on first use and cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def solve_lower_stack(L: np.ndarray, B: np.ndarray, X: np.ndarray) -> None:
    """Write X with ``L[b] X[b] = B[b]``; L (nb, c, c) lower triangular, B and X (nb, c, r).

    Forward substitution four rows at a time (each row of X read once per
    four output rows), the four accumulators vectorised over the r columns.
    c^2 r flops per block.  Releases the GIL: callers split the stack of
    blocks between threads.
    """
    nb, c, r = B.shape
    for b in range(nb):
        Lb = L[b]
        Xb = X[b]
        for i in range(0, c, 4):
            h = min(4, c - i)
            acc = B[b, i : i + h].copy()
            for j in range(i):
                x = Xb[j]
                for t in range(h):
                    lij = Lb[i + t, j]
                    a = acc[t]
                    for col in range(r):
                        a[col] -= lij * x[col]
            for t in range(h):
                a = acc[t]
                for s in range(t):
                    lts = Lb[i + t, i + s]
                    xs = acc[s]
                    for col in range(r):
                        a[col] -= lts * xs[col]
                inv = 1.0 / Lb[i + t, i + t]
                for col in range(r):
                    a[col] *= inv
            Xb[i : i + h] = acc
