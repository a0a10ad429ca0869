"""Compiled (Numba) loops behind the NumPy backend of the core kernels.

Two loops of the chunked solve are not single level-3 calls:

- the triangular solve with every c x c diagonal block, a stack of small
  independent problems.  LAPACK's ``trsm`` called once per block is slow at
  this size (about 13 GFLOP/s in float64 here, one thread) and holds the GIL,
  so the blocks cannot be shared between threads; :func:`solve_lower_stack`
  releases it, and :func:`solve_chunk_blocks` also forms each block, in L1,
  just before it is used;
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


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _strict_lower_product(qb: np.ndarray, kb: np.ndarray, out: np.ndarray) -> None:
    """``out[i, j] = qb[i] . kb[j]`` for j < i only (the rest of out is left as is).

    qb, kb: (c, d).  Half the flops of the full product, and faster than
    BLAS's q k^T at c = 32, d = 64 (whose transposed operand it packs): dot
    products of contiguous rows, four rows of q against each row of k so
    that every load of k feeds four multiply-adds.  ``reassoc`` lets the
    compiler split each dot product over vector lanes.
    """
    c, d = qb.shape
    i0 = 0
    while i0 + 4 <= c:
        q0, q1, q2, q3 = qb[i0], qb[i0 + 1], qb[i0 + 2], qb[i0 + 3]
        for j in range(i0 + 3):  # rows i0..i0+3 all need columns below i0 + 3
            kj = kb[j]
            s0 = s1 = s2 = s3 = 0.0
            for p in range(d):
                kp = kj[p]
                s0 += q0[p] * kp
                s1 += q1[p] * kp
                s2 += q2[p] * kp
                s3 += q3[p] * kp
            out[i0, j] = s0
            out[i0 + 1, j] = s1
            out[i0 + 2, j] = s2
            out[i0 + 3, j] = s3
        i0 += 4
    for i in range(i0, c):
        qi = qb[i]
        for j in range(i):
            kj = kb[j]
            s = 0.0
            for p in range(d):
                s += qi[p] * kj[p]
            out[i, j] = s


@jit(nogil=True, fastmath={"contract"})
def _forward_substitute(Lb: np.ndarray, Bb: np.ndarray, Xb: np.ndarray) -> None:
    """``Xb = Lb^-1 Bb`` for one lower-triangular block (its upper triangle unread).

    Right-looking forward substitution by panels of four rows: solve the
    4 x 4 diagonal triangle of the panel, then subtract its rank-4
    contribution ``L[below, panel] X[panel]`` from every row below.  The
    update streams one row of X against four rows held in L1 (four
    multiply-adds per load and store), which vectorises over the r columns
    and runs 1.6x faster than updating one row of X at a time.
    ``contract`` allows fused multiply-adds only.
    """
    c, r = Bb.shape
    Xb[:] = Bb
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


@jit(nogil=True, fastmath={"contract"})
def solve_lower_stack(L: np.ndarray, B: np.ndarray, X: np.ndarray) -> None:
    """Write X with ``L[b] X[b] = B[b]``; L (nb, c, c) lower triangular, B and X (nb, c, r).

    Only the lower triangle of L is read.  c^2 r flops per block.  Releases
    the GIL: callers split the stack of blocks between threads.
    """
    for b in range(B.shape[0]):
        _forward_substitute(L[b], B[b], X[b])


@jit(nogil=True, fastmath={"contract"})
def solve_chunk_blocks(
    q: np.ndarray,
    k: np.ndarray,
    lam: np.ndarray,
    mask: np.ndarray,
    B1: np.ndarray,
    B2: np.ndarray,
    X1: np.ndarray,
    X2: np.ndarray,
) -> None:
    """Form each diagonal block of T and solve with it, for two right-hand sides.

    q, k: (nb, c, d); lam: (nb, c); mask: (nb, c, c), the decay mask of each
    block (zero on and above the diagonal), or (0, c, c) for none; B1, X1:
    (nb, c, r1); B2, X2: (nb, c, r2).  For every b, with
    ``L = diag(lam[b]) + tril(q[b] k[b]^T ⊙ mask[b], -1)``, writes
    ``X1[b] = L^-1 B1[b]`` and ``X2[b] = L^-1 B2[b]``.

    The block lives only in a c x c buffer in L1: one pass over q and k, no
    stack of blocks written to memory and read back twice.  c^2 (d + r1 + r2)
    flops per block.  Releases the GIL.
    """
    c = q.shape[1]
    block = np.empty((c, c), q.dtype)
    masked = mask.shape[0] > 0
    for b in range(q.shape[0]):
        _strict_lower_product(q[b], k[b], block)
        if masked:
            mb = mask[b]
            for i in range(c):
                for j in range(i):
                    block[i, j] *= mb[i, j]
        for i in range(c):
            block[i, i] = lam[b, i]
        _forward_substitute(block, B1[b], X1[b])
        _forward_substitute(block, B2[b], X2[b])


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
) -> float:
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
    their results in every chunk).  The next chunk's operands are read into
    cache while this chunk's products run: 10-15% faster at n = 16384, where
    w, k_out and u do not fit in the L2 cache.  The return value has no
    meaning (it keeps the compiler from dropping those reads).
    """
    c, d = w.shape[2], w.shape[3]
    width = col_stop - col_start
    wz = np.empty((c, width), u.dtype)
    yj = np.empty((c, width), u.dtype)
    ky = np.empty((d, width), u.dtype)
    keep = states.shape[1] > 1
    nc = u.shape[1]
    sink = 0.0
    for b in range(u.shape[0]):
        z = z0[b, :, col_start:col_stop].copy()
        states[b, 0, :, col_start:col_stop] = z
        for j in range(nc):
            if j + 1 < nc:
                sink += _touch(w[b, j + 1], 0, d) + _touch(k_out[b, j + 1], 0, d)
                sink += _touch(u[b, j + 1], col_start, col_stop)
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
    return sink


@jit(nogil=True)
def _touch(a: np.ndarray, col_start: int, col_stop: int) -> float:
    """Read one element per 64-byte cache line of ``a[:, col_start:col_stop]``."""
    step = max(1, 64 // a.itemsize)
    total = 0.0
    for r in range(a.shape[0]):
        for col in range(col_start, col_stop, step):
            total += a[r, col]
    return total
