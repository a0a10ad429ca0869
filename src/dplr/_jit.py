"""Compiled (Numba) loops behind the NumPy backend of the core kernels.

Two loops of the chunked solve are not single level-3 calls:

- the triangular solve with every c x c diagonal block, a stack of small
  independent problems.  LAPACK's ``trsm`` called once per block is slow at
  this size (about 13 GFLOP/s in float64 here, one thread) and holds the GIL,
  so the blocks cannot be shared between threads; :func:`solve_lower_stack`
  releases it;
- the sequential pass over the chunks (:func:`state_pass`): in compiled
  code it has no interpreter overhead between its small products and
  releases the GIL, so independent batch entries run on all cores at once.

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


@jit(nogil=True)
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


@jit(nogil=True)
def state_pass(
    w: np.ndarray,
    u: np.ndarray,
    k_out: np.ndarray,
    decay: np.ndarray,
    z0: np.ndarray,
    y: np.ndarray,
    states: np.ndarray,
) -> None:
    """The sequential part of the chunked solve for a stack of B problems.

    w, k_out: (B, nc, c, d); u, y: (B, nc, c, m); decay: (B, nc);
    z0: (B, d, m); states: (B, nc + 1, d, m), or (B, 1, d, m) to keep only the
    final state.  Writes y and states::

        states[:, 0] = z0
        y[:, J] = u[:, J] - w[:, J] @ states[:, J]
        states[:, J + 1] = decay[:, J] * states[:, J] + k_out[:, J]^T @ y[:, J]

    Problems are independent: threads can run disjoint slices of the stack.
    The products write into buffers allocated once (16% faster than
    allocating their results in every chunk).
    """
    c, d, m = w.shape[2], w.shape[3], u.shape[3]
    wz = np.empty((c, m), u.dtype)
    ky = np.empty((d, m), u.dtype)
    keep = states.shape[1] > 1
    for b in range(u.shape[0]):
        z = z0[b].copy()
        states[b, 0] = z
        for j in range(u.shape[1]):
            np.dot(w[b, j], z, wz)
            yj, uj = y[b, j], u[b, j]
            for r in range(c):
                for s in range(m):
                    yj[r, s] = uj[r, s] - wz[r, s]
            np.dot(k_out[b, j].T, yj, ky)
            a = decay[b, j]
            for r in range(d):
                for s in range(m):
                    z[r, s] = a * z[r, s] + ky[r, s]
            if keep:
                states[b, j + 1] = z
        states[b, states.shape[1] - 1] = z
