"""Compiled (Numba) loops behind the NumPy backend of the core kernels.

Three loops of the chunked algorithms are not single level-3 calls:

- the diagonal blocks of T (:func:`form_chunk_blocks`): only their strict
  lower triangles are needed, half the flops of BLAS's ``q k^T``;
- the sequential pass of the solve (:func:`substitution_pass`): per chunk a
  product with the state, a forward substitution with the c x c block and a
  product into the state.  Compiled, it has no interpreter overhead between
  these small steps (its two products are BLAS ``gemm`` calls made from the
  loop) and releases the GIL, so independent batch entries, or independent
  column ranges of one entry, run on all cores at once;
- its reverse pass for the gradients (:func:`adjoint_pass`), the same two
  products per chunk with the chunks in reverse order;
- triangular solves with a stack of c x c blocks (:func:`solve_lower_stack`,
  for the inverse and the gradients).  LAPACK's ``trsm`` called once per
  block is slow at this size (about 13 GFLOP/s in float64 here, one thread)
  and holds the GIL, so the blocks could not be shared between threads.

All take C-contiguous float32/float64 arrays (the callers ensure that); the
runtime's operations (:mod:`dplr._runtime.backend`) receive them as
``kernel=`` and spread them over threads.
"""

from __future__ import annotations

import numpy as np

from .._runtime import tuning
from .._runtime.gemm import gemm, gemm_scratch
from .._runtime.jit import jit
from .._runtime.prefetch import prefetch_rows


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
    zero = qb.dtype.type(0)  # accumulate in the arrays' precision
    i0 = 0
    while i0 + 4 <= c:
        q0, q1, q2, q3 = qb[i0], qb[i0 + 1], qb[i0 + 2], qb[i0 + 3]
        for j in range(i0 + 3):  # rows i0..i0+3 all need columns below i0 + 3
            kj = kb[j]
            acc0 = acc1 = acc2 = acc3 = zero
            for p in range(d):
                kp = kj[p]
                acc0 += q0[p] * kp
                acc1 += q1[p] * kp
                acc2 += q2[p] * kp
                acc3 += q3[p] * kp
            out[i0, j] = acc0
            out[i0 + 1, j] = acc1
            out[i0 + 2, j] = acc2
            out[i0 + 3, j] = acc3
        i0 += 4
    for i in range(i0, c):
        qi = qb[i]
        for j in range(i):
            kj = kb[j]
            acc = zero
            for p in range(d):
                acc += qi[p] * kj[p]
            out[i, j] = acc


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
    one = Lb.dtype.type(1)  # keeps float32 rows in float32
    Xb[:] = Bb
    for p in range(0, c, 4):
        height = min(4, c - p)
        for t in range(p, p + height):
            row = Xb[t]
            for j in range(p, t):
                ltj = Lb[t, j]
                xj = Xb[j]
                for col in range(r):
                    row[col] -= ltj * xj[col]
            inv = one / Lb[t, t]
            for col in range(r):
                row[col] *= inv
        if height < 4:
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
def solve_lower_transposed_stack(L: np.ndarray, B: np.ndarray, X: np.ndarray) -> None:
    """Write X with ``L[b]^T X[b] = B[b]``; L (nb, c, c) lower triangular, B and X (nb, c, r).

    Each block by :func:`back_substitute`.  c^2 r flops per block, no
    transposed or reversed copies.  Releases the GIL.
    """
    scratch = gemm_scratch(L.dtype)
    for b in range(B.shape[0]):
        X[b] = B[b]
        back_substitute(L[b], X[b], scratch)


@jit(nogil=True, fastmath={"contract"})
def back_substitute(Lb: np.ndarray, Xb: np.ndarray, scratch) -> None:
    """``Xb <- Lb^-T Xb`` in place for one lower-triangular block (its upper triangle unread).

    Lb (c, c), Xb (c, r) with contiguous rows; ``scratch`` is
    :func:`~dplr._runtime.gemm.gemm_scratch` of the dtype.  Back substitution
    by blocks of :data:`~dplr._runtime.tuning.SUBSTITUTION_BLOCK_ROWS` rows,
    last first: the rows below a block enter it through one product with
    L's entries under the block (transposed), then the block's rows are
    solved one by one, last first.  c^2 r flops.
    """
    c, r = Xb.shape
    one = Lb.dtype.type(1)  # keeps float32 rows in float32
    step = tuning.SUBSTITUTION_BLOCK_ROWS
    for i1 in range(c, 0, -step):
        i0 = max(i1 - step, 0)
        if i1 < c:
            gemm(Lb[i1:, i0:i1], Xb[i1:], Xb[i0:i1], -1.0, 1.0, True, scratch)
        for t in range(i1 - 1, i0 - 1, -1):
            row = Xb[t]
            for m in range(t + 1, i1):
                lmt = Lb[m, t]
                xm = Xb[m]
                for col in range(r):
                    row[col] -= lmt * xm[col]
            inv = one / Lb[t, t]
            for col in range(r):
                row[col] *= inv


@jit(nogil=True, fastmath={"contract"})
def form_chunk_blocks(
    q: np.ndarray, k: np.ndarray, lam: np.ndarray, mask: np.ndarray, out: np.ndarray
) -> None:
    """The diagonal blocks of T: ``out[b] = diag(lam[b]) + tril(q[b] k[b]^T ⊙ mask[b], -1)``.

    q, k: (nb, c, d); lam: (nb, c); mask: (nb, c, c), the decay mask of each
    block (zero on and above the diagonal), or (0, c, c) for none; out:
    (nb, c, c).  Only the lower triangle of out is written (the solves read
    nothing else).  c^2 d flops per block.  Releases the GIL.
    """
    c = q.shape[1]
    masked = mask.shape[0] > 0
    for b in range(q.shape[0]):
        block = out[b]
        _strict_lower_product(q[b], k[b], block)
        if masked:
            mb = mask[b]
            for i in range(c):
                for j in range(i):
                    block[i, j] *= mb[i, j]
        for i in range(c):
            block[i, i] = lam[b, i]


@jit(nogil=True, fastmath={"contract"})
def substitution_pass(
    q_in: np.ndarray,
    blocks: np.ndarray,
    k_out: np.ndarray,
    decay: np.ndarray,
    v: np.ndarray,
    h0: np.ndarray,
    y: np.ndarray,
    states: np.ndarray,
    col_start: int,
    col_stop: int,
) -> bool:
    """The sequential part of the chunked solve for a stack of B problems.

    q_in, k_out: (B, nc, c, d); blocks: (B, nc, c, c) lower triangular;
    decay: (B, nc, 1) or, per channel, (B, nc, d); v, y: (B, nc, c, m); h0: (B, d, m); states:
    (B, nc + 1, d, m), or (B, 1, d, m) to keep only the final state.  Writes
    columns ``col_start:col_stop`` of y and states::

        states[:, 0] = h0
        y[:, J] = blocks[:, J]^-1 (v[:, J] - q_in[:, J] @ states[:, J])
        states[:, J + 1] = Diag(decay[:, J]) states[:, J] + k_out[:, J]^T @ y[:, J]

    Problems are independent, and so are the columns of one problem: threads
    can run disjoint slices of the stack or disjoint column ranges.  Returns
    True if every entry of v that it read (its columns of v) is finite: a
    NaN/Inf check of v in the same pass, instead of a pass of its own.

    Both products are BLAS ``gemm`` calls (:func:`dplr._runtime.gemm.gemm`,
    ``k_out^T`` read in place) on the state held as a contiguous d x w
    array: at c = 32, d = 64, w = 32 about 80 GFLOP/s in float64, where
    hand-written dot products on a transposed state ran at 23-32.  The next
    chunk's operands are prefetched while this chunk is computed (those of
    n = 16384 do not fit in cache).  ``docs/algorithms.md``, section 9.
    """
    c, d = q_in.shape[2], q_in.shape[3]
    width = col_stop - col_start
    rhs = np.empty((c, width), v.dtype)
    yj = np.empty((c, width), v.dtype)
    h = np.empty((d, width), v.dtype)
    scratch = gemm_scratch(v.dtype)
    keep = states.shape[1] > 1
    nc = v.shape[1]
    per_channel = decay.shape[2] > 1
    one = v.dtype.type(1)  # keeps float32 products in float32
    finite = True
    for b in range(v.shape[0]):
        _read_columns(h0[b], col_start, h)
        _write_columns(h, states[b, 0], col_start)
        for j in range(nc):
            if j + 1 < nc:
                prefetch_rows(q_in[b, j + 1], 0, d)
                prefetch_rows(k_out[b, j + 1], 0, d)
                prefetch_rows(blocks[b, j + 1], 0, c)
                prefetch_rows(v[b, j + 1], col_start, col_stop)
            finite &= _read_columns(v[b, j], col_start, rhs)
            gemm(q_in[b, j], h, rhs, -one, one, False, scratch)
            _forward_substitute(blocks[b, j], rhs, yj)
            _write_columns(yj, y[b, j], col_start)
            if per_channel:  # scale row p of the state by its decay
                dj = decay[b, j]
                for p in range(d):
                    for col in range(width):
                        h[p, col] *= dj[p]
                gemm(k_out[b, j], yj, h, one, one, True, scratch)
            else:  # beta = 0 (a reset) does not read h
                gemm(k_out[b, j], yj, h, one, decay[b, j, 0], True, scratch)
            if keep:
                _write_columns(h, states[b, j + 1], col_start)
        if not keep:  # the final state only
            _write_columns(h, states[b, 0], col_start)
    return finite


@jit(nogil=True)
def _read_columns(wide: np.ndarray, col_start: int, narrow: np.ndarray) -> bool:
    """``narrow = wide[:, col_start:col_start + w]`` for narrow (r, w); True if all are finite.

    ``x - x`` is 0 for a finite x and NaN for NaN and +-Inf (no ``fastmath``
    here that could fold it to 0); or-ing the comparisons vectorises.
    """
    bad = 0
    for r in range(narrow.shape[0]):
        for col in range(narrow.shape[1]):
            x = wide[r, col_start + col]
            narrow[r, col] = x
            bad |= (x - x) != 0
    return bad == 0


@jit(nogil=True)
def _write_columns(narrow: np.ndarray, wide: np.ndarray, col_start: int) -> None:
    """``wide[:, col_start:col_start + w] = narrow`` for narrow (r, w)."""
    for r in range(narrow.shape[0]):
        for col in range(narrow.shape[1]):
            wide[r, col_start + col] = narrow[r, col]


@jit(nogil=True, fastmath={"contract"})
def adjoint_pass(
    k_out: np.ndarray,
    wy: np.ndarray,
    decay: np.ndarray,
    dy_local: np.ndarray,
    dh_add: np.ndarray,
    dh_last: np.ndarray,
    dy: np.ndarray,
    dh: np.ndarray,
    dh0: np.ndarray,
    col_start: int,
    col_stop: int,
) -> None:
    """The reverse pass of :func:`substitution_pass` for a stack of B problems.

    k_out, wy: (B, nc, c, d); decay: (B, nc, 1) or, per channel, (B, nc, d);
    dy_local, dy: (B, nc, c, m); dh_add, dh: (B, nc, d, m); dh_last, dh0:
    (B, d, m).  From ``dH = dh_last``, for J = nc - 1 down to 0, writes
    columns ``col_start:col_stop`` of::

        dh[:, J] = dH                                  (the gradient of the state leaving J)
        dy[:, J] = dy_local[:, J] + k_out[:, J] @ dH
        dH      <- Diag(decay[:, J]) dH + dh_add[:, J] - wy[:, J]^T @ dy[:, J]

    and ``dh0 = dH`` at the end.  As in :func:`substitution_pass` both
    products are BLAS ``gemm`` calls on the state held as a contiguous
    d x w array; problems and column ranges are independent.
    """
    c, d = k_out.shape[2], k_out.shape[3]
    nc = k_out.shape[1]
    width = col_stop - col_start
    dyj = np.empty((c, width), dy.dtype)
    dh_j = np.empty((d, width), dy.dtype)
    scratch = gemm_scratch(dy.dtype)
    per_channel = decay.shape[2] > 1
    one = dy.dtype.type(1)  # keeps float32 products in float32
    for b in range(k_out.shape[0]):
        _read_columns(dh_last[b], col_start, dh_j)
        for j in range(nc - 1, -1, -1):
            _write_columns(dh_j, dh[b, j], col_start)
            _read_columns(dy_local[b, j], col_start, dyj)
            gemm(k_out[b, j], dh_j, dyj, one, one, False, scratch)
            _write_columns(dyj, dy[b, j], col_start)
            add, dj = dh_add[b, j], decay[b, j]
            for p in range(d):
                a = dj[p] if per_channel else dj[0]
                for col in range(width):
                    dh_j[p, col] = dh_j[p, col] * a + add[p, col_start + col]
            gemm(wy[b, j], dyj, dh_j, -one, one, True, scratch)
        _write_columns(dh_j, dh0[b], col_start)


@jit(nogil=True, fastmath={"contract"})
def recurrence(
    q: np.ndarray,
    k: np.ndarray,
    lam: np.ndarray,
    decay: np.ndarray,
    v: np.ndarray,
    h0: np.ndarray,
    y: np.ndarray,
    hn: np.ndarray,
    solve: bool,
    col_start: int,
    col_stop: int,
) -> bool:
    """Row by row: the product ``T V`` or the solve ``T^-1 V`` with the state, for small d.

    q, k: (B, n, d); lam: (B, n), or (B, 0) for a unit diagonal; decay:
    (B, n, e), the decay *factors* ``exp(log_decay)`` in [0, 1] with e = 1
    (per row) or d (per channel), or e = 0 for none; v, y: (B, n, m); h0,
    hn: (B, d, m).  For columns ``col_start:col_stop``, with the state
    ``H = h0``, every row i does

        H <- Diag(a_i) H
        y_i = lam_i v_i + q_i . H           (product)    H <- H + k_i v_i^T
        y_i = (v_i - q_i . H) / lam_i       (solve)      H <- H + k_i y_i^T

    and ``hn`` is the final H.  O(n d m) flops and no memory beyond the
    state: for d up to about 8 the chunked form spends most of its time on
    c x c blocks that this loop never forms.  A factor of exactly 0 (a
    ``-inf`` log decay) resets H exactly.

    Returns True if every entry of q, k, lam, decay and of the columns of v
    that it read is finite: the callers' NaN/Inf check, done in this pass
    instead of a pass of its own (``x - x`` is 0 for finite x and NaN for
    NaN and +-Inf; the flags ``fastmath`` allows here do not fold it to 0).
    The solve multiplies by ``1 / lam_i``, computed off the chain of
    dependent operations from row to row (a division on that chain cost a
    quarter of the time at d = 2, m = 1).
    """
    n, d = q.shape[1], q.shape[2]
    e = decay.shape[2]
    unit = lam.shape[1] == 0
    width = col_stop - col_start
    h = np.empty((d, width), v.dtype)
    one = v.dtype.type(1)  # keeps float32 rows in float32
    bad = 0
    for b in range(q.shape[0]):
        # 2-D views per batch entry, indexed [i, p] below: views made per row
        # cost 4x the arithmetic at d = 4, m = 1.
        qb, kb, vb, yb, lb, db = q[b], k[b], v[b], y[b], lam[b], decay[b]
        for p in range(d):
            for col in range(width):
                h[p, col] = h0[b, p, col_start + col]
        for i in range(n):
            if e == 1:
                a = db[i, 0]
                bad |= (a - a) != 0
                for p in range(d):
                    for col in range(width):
                        h[p, col] *= a
            elif e > 1:
                for p in range(d):
                    a = db[i, p]
                    bad |= (a - a) != 0
                    for col in range(width):
                        h[p, col] *= a
            li = one if unit else lb[i]
            inv = one / li if solve else one  # a product may have zeros on the diagonal
            bad |= (li - li) != 0
            for p in range(d):
                x = qb[i, p]
                bad |= (x - x) != 0
                x = kb[i, p]
                bad |= (x - x) != 0
            for col in range(width):
                vi = vb[i, col_start + col]
                bad |= (vi - vi) != 0
                acc = v.dtype.type(0)
                for p in range(d):
                    acc += qb[i, p] * h[p, col]
                if solve:
                    yi = vi - acc if unit else (vi - acc) * inv
                    yb[i, col_start + col] = yi
                    for p in range(d):
                        h[p, col] += kb[i, p] * yi
                else:
                    yb[i, col_start + col] = (vi if unit else li * vi) + acc
                    for p in range(d):
                        h[p, col] += kb[i, p] * vi
        for p in range(d):
            for col in range(width):
                hn[b, p, col_start + col] = h[p, col]
    return bad == 0
