"""Compiled (Numba) loops behind the NumPy backend of the core kernels.

Two loops of the chunked solve are not single level-3 calls:

- the triangular solve with every c x c diagonal block, a stack of small
  independent problems.  LAPACK's ``trsm`` called once per block is slow at
  this size (about 13 GFLOP/s in float64 here, one thread) and holds the GIL,
  so the blocks cannot be shared between threads; :func:`solve_lower_stack`
  releases it;
- the sequential pass over the chunks (:func:`state_pass`): in compiled
  code it has no interpreter overhead between its small products and
  releases the GIL, so independent batch entries, or independent column
  ranges of one entry, run on all cores at once.

Both take C-contiguous float32/float64 arrays (the callers ensure that).  The
:func:`jit` decorator is shared with the Cholesky kernels (``_rank1.py``).
"""

from __future__ import annotations

import warnings

import numba as nb
import numpy as np


def jit(**options):
    """``numba.njit`` with an on-disk cache when some cache directory is writable.

    Numba caches next to the source file, or in the user-wide cache directory
    (``NUMBA_CACHE_DIR`` overrides both) when the package is read-only; if no
    location is writable, compile in memory instead of failing at import.
    """

    def wrap(fn):
        try:
            return nb.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "no locator available": nowhere to cache
            warnings.warn(f"dplr: numba cache disabled ({exc})", RuntimeWarning, stacklevel=2)
            return nb.njit(cache=False, **options)(fn)

    return wrap


@jit(nogil=True, fastmath={"contract"})
def solve_lower_stack(L: np.ndarray, B: np.ndarray, X: np.ndarray) -> None:
    """Write X with ``L[b] X[b] = B[b]``; L (nb, c, c) lower triangular, B and X (nb, c, r).

    Right-looking forward substitution by panels of four rows: solve the
    4 x 4 diagonal triangle of the panel, then subtract its rank-4
    contribution ``L[below, panel] X[panel]`` from every row below.  The
    update streams one row of X against four rows held in L1 (four
    multiply-adds per load and store), which vectorises over the r columns
    and runs 1.6x faster than updating one row of X at a time.  c^2 r flops
    per block; ``contract`` allows fused multiply-adds only.  Releases the
    GIL: callers split the stack of blocks between threads.
    """
    nb, c, r = B.shape
    for b in range(nb):
        Lb = L[b]
        Xb = X[b]
        Xb[:] = B[b]
        for p in range(0, c, 4):
            h = min(4, c - p)
            for t in range(p, p + h):
                row = Xb[t]
                for j in range(p, t):
                    ltj = Lb[t, j]
                    xj = Xb[j]
                    for col in range(r):
                        row[col] -= ltj * xj[col]
                inv = 1.0 / Lb[t, t]
                for col in range(r):
                    row[col] *= inv
            if h < 4:
                break
            x0, x1, x2, x3 = Xb[p], Xb[p + 1], Xb[p + 2], Xb[p + 3]
            for t in range(p + 4, c):
                l0, l1, l2, l3 = Lb[t, p], Lb[t, p + 1], Lb[t, p + 2], Lb[t, p + 3]
                row = Xb[t]
                for col in range(r):
                    row[col] -= l0 * x0[col] + l1 * x1[col] + l2 * x2[col] + l3 * x3[col]


@jit(nogil=True)
def state_pass(
    w: np.ndarray,
    u: np.ndarray,
    k_out: np.ndarray,
    decay: np.ndarray,
    z0: np.ndarray,
    y: np.ndarray,
    states: np.ndarray,
    col_start: int,
    col_stop: int,
) -> None:
    """The sequential part of the chunked solve for a stack of B problems.

    w, k_out: (B, nc, c, d); u, y: (B, nc, c, m); decay: (B, nc);
    z0: (B, d, m); states: (B, nc + 1, d, m), or (B, 1, d, m) to keep only the
    final state.  Writes columns ``col_start:col_stop`` of y and states (y may
    be u itself: each element of u is read just before y's is written)::

        states[:, 0] = z0
        y[:, J] = u[:, J] - w[:, J] @ states[:, J]
        states[:, J + 1] = decay[:, J] * states[:, J] + k_out[:, J]^T @ y[:, J]

    Problems are independent, and so are the columns of one problem: threads
    can run disjoint slices of the stack or disjoint column ranges.  The
    products write into buffers allocated once (16% faster than allocating
    their results in every chunk).
    """
    c, d = w.shape[2], w.shape[3]
    width = col_stop - col_start
    wz = np.empty((c, width), u.dtype)
    yj = np.empty((c, width), u.dtype)
    ky = np.empty((d, width), u.dtype)
    keep = states.shape[1] > 1
    for b in range(u.shape[0]):
        z = z0[b, :, col_start:col_stop].copy()
        states[b, 0, :, col_start:col_stop] = z
        for j in range(u.shape[1]):
            np.dot(w[b, j], z, wz)
            uj, y_out = u[b, j], y[b, j]
            for r in range(c):
                for s in range(width):
                    yj[r, s] = uj[r, col_start + s] - wz[r, s]
                    y_out[r, col_start + s] = yj[r, s]
            np.dot(k_out[b, j].T, yj, ky)
            a = decay[b, j]
            for r in range(d):
                for s in range(width):
                    z[r, s] = a * z[r, s] + ky[r, s]
            if keep:
                states[b, j + 1, :, col_start:col_stop] = z
        states[b, states.shape[1] - 1, :, col_start:col_stop] = z
