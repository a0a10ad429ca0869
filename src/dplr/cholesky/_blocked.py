"""Blocked rank-M update and downdate of a Cholesky factor by orthogonal reductions.

Both work on ``R = L^T`` (upper triangular) and are backward stable whatever
the conditioning of ``L`` (derivations and error bounds: ``docs/cholesky.md``,
section 2):

- update: the QR factorisation of ``[R; U^T]`` that keeps R's triangle,
  ``Q^T [R; U^T] = [R'; 0]``, block column by block column (LAPACK's
  triangular-pentagonal QR ``?tpqrt`` for NumPy, the same reduction with
  dense panel QRs for torch);
- downdate: LINPACK's solve-then-rotate in blocks.  ``W = L^-1 U``;
  ``B = A - U U^T`` is positive definite iff ``I - W^T W`` is (checked
  before anything is written); ``G = [W; S]`` with ``S^T S = I - W^T W``
  has orthonormal columns, and the orthogonal Q that moves G into its last
  M rows, block row by block row from the bottom, turns ``[R; 0]`` into
  ``[R'; X]`` with ``R'^T R' = A - U U^T``.

This is a chunk loop of its own, separate from ``dplr.core``: its blocks are
orthogonal transformations of a dense triangle, not the chunks of the
diagonal-plus-low-rank solve.  All functions assume validated input: the
same float dtype, finite, ``u`` already scaled by ``sqrt(|multiplier|)``.
"""

from __future__ import annotations

import numpy as np

from .._runtime import lapack as _lapack
from .._runtime import threads
from .._runtime import tuning as _t
from .._runtime.backend import Array, Ops
from .._runtime.blas import single_threaded_blas
from . import _rank1

#: ``nb`` of ``?tpqrt``, and rows per block of the dense-panel reductions.
TPQRT_BLOCK = _t.CHOLESKY_TPQRT_BLOCK
PANEL_COLUMNS = _t.CHOLESKY_TPQRT_PANEL
PANEL = _t.CHOLESKY_CHUNK_ROWS


# ------------------------------------------------------------ small helpers
def tril_block(ops: Ops, a: Array) -> Array:
    """The lower triangle of ``a`` (a new array), zeros above."""
    return ops.where(ops.strict_lower_mask(a.shape[-1], a).mT, 0.0, a)


def _signs(ops: Ops, d: Array) -> Array:
    """+1 where ``d >= 0``, -1 elsewhere (flipping a row of R keeps ``R^T R``)."""
    return ops.where(d < 0, -1.0, ops.zeros(d.shape, d) + 1.0)


# ------------------------------------------------------------------ update
def uses_lapack(ops: Ops, low: Array, block: int | None) -> bool:
    """True if :func:`update` runs LAPACK's ``?tpqrt`` (NumPy float32/float64, no ``block``)."""
    return ops.name == "numpy" and low.dtype in (np.float32, np.float64) and block is None


def update(
    ops: Ops,
    low: Array,
    u: Array,
    out: Array,
    block: int | None = None,
    check_finite: bool = False,
    out_zero: bool = False,
) -> bool:
    """``out`` (lower) = the Cholesky factor of ``L L^T + U U^T``.

    low: (..., N, N) lower triangle read; u: (..., N, M); out: (..., N, N)
    with the full batch shape, may be ``low`` itself.  Cannot fail.  The
    strict upper triangle of ``out`` is set to zero.

    LAPACK's ``?tpqrt`` is a different algorithm (a method, not a spelling),
    reachable only from NumPy arrays; torch tensors and an explicit ``block``
    (the tests' way to reach the panels on NumPy) take the dense-panel QRs.

    With ``check_finite`` (LAPACK path only, ``out`` not ``low``) the triangle
    of ``low`` is checked while it is copied, and False is returned, with
    nothing computed, if it is not finite; otherwise the result is True.
    ``out_zero`` says that ``out`` is new zero-filled memory (its strict upper
    triangle is then not written again).
    """
    if uses_lapack(ops, low, block):
        return _update_lapack(low, u, out, check_finite, out_zero)
    ops.copy_lower(out, low, kernel=_rank1.copy_tri)
    _update_panels(ops, out.mT, u.mT, block or PANEL)
    return True


def _update_lapack(
    low: np.ndarray, u: np.ndarray, out: np.ndarray, check_finite: bool, out_zero: bool
) -> bool:
    """``?tpqrt`` on ``[-R; U^T]``, one factor of the batch at a time.

    Householder reflectors map ``(alpha, x)`` to ``(-sign(alpha) ||.||, 0)``;
    starting from ``-R`` (negative diagonal) the new diagonal comes out
    positive without a pass over the result.  A diagonal entry of R is only
    modified by its own reflector, so each alpha is still ``-R_kk < 0``; the
    entries left negative (a reflector that did nothing) are flipped after.
    """
    batch = out.shape[:-2]
    low_b = np.broadcast_to(low, out.shape)
    u_b = np.broadcast_to(u, (*batch, *u.shape[-2:]))
    for idx in np.ndindex(*batch):
        dst = out[idx]
        if not _rank1.negate_lower(dst, low_b[idx], zero_above=not out_zero) and check_finite:
            return False
        # dst.T is upper and column-major when dst is C-ordered: LAPACK works in place
        r = dst.T if dst.T.flags.f_contiguous else np.asfortranarray(dst.T)
        reduce_pentagonal(r, np.array(u_b[idx].T, order="F"))
        if r is not dst.T:
            dst[...] = r.T
        neg = np.flatnonzero(np.diagonal(dst) < 0)
        for j in neg:
            dst[j:, j] *= -1.0
    return True


def reduce_pentagonal(r: np.ndarray, bt: np.ndarray) -> None:
    """``[r; bt] <- Q^T [r; bt] = [r'; *]`` in place: r (N, N) upper, bt (M, N), column-major.

    The triangular-pentagonal QR by panels of ``PANEL_COLUMNS`` columns:
    ``?tpqrt`` reduces a panel (its block reflectors are ``nb`` columns wide),
    then ``?tpmqrt`` applies them to the columns right of the panel, which are
    independent of each other and split over dplr's threads (one BLAS thread
    each).  One ``?tpqrt`` call over all N columns is the same reduction in
    one thread.
    """
    n = r.shape[-1]
    with single_threaded_blas():
        for start in range(0, n, PANEL_COLUMNS):
            stop = min(start + PANEL_COLUMNS, n)
            t = np.empty((min(TPQRT_BLOCK, stop - start), stop - start), r.dtype, order="F")
            _lapack.tpqrt(r, bt, start, stop, t)
            if stop == n:
                break
            v, rows = bt[:, start:stop], slice(start, stop)
            wide = n - stop >= PANEL_COLUMNS
            parts = threads.split(n - stop, threads.num_workers() if wide else 1)

            def apply(part: slice, v=v, t=t, rows=rows, stop=stop) -> None:
                cols = slice(stop + part.start, stop + part.stop)
                _lapack.tpmqrt_transposed(v, t, r, bt, rows, cols)

            threads.run_all(apply, parts)


def _update_panels(ops: Ops, r: Array, bt: Array, block: int) -> None:
    """The same reduction with a dense QR per block column; r upper, written in place.

    For the block J of rows/columns ``start:stop``, the panel ``[R_JJ; B_J]`` (a
    triangle over M rows) has the QR ``Q [T; 0]``; ``Q^T`` applied to
    ``[R_J, after J; B_after J]`` finishes the block row of R' and leaves the
    rows of B to be reduced by the next blocks.
    """
    n = r.shape[-1]
    bt = ops.copy(bt)
    for start in range(0, n, block):
        stop = min(start + block, n)
        width = stop - start
        panel = ops.concat([r[..., start:stop, start:stop], bt[..., :, start:stop]], -2)
        q, t = ops.qr_complete(panel)
        signs = _signs(ops, t.diagonal(0, -2, -1))[..., :width, None]
        r[..., start:stop, start:stop] = t[..., :width, :] * signs
        if stop < n:
            rest = q.mT @ ops.concat([r[..., start:stop, stop:], bt[..., :, stop:]], -2)
            r[..., start:stop, stop:] = rest[..., :width, :] * signs
            bt[..., :, stop:] = rest[..., width:, :]


# ---------------------------------------------------------------- downdate
def downdate_check(ops: Ops, low: Array, u: Array) -> tuple[Array, Array, Array]:
    """``W = L^-1 U``, ``S`` with ``S^T S = I - W^T W``, and where that is positive definite.

    Returns ``(w, s_root, ok)``: w (..., N, M), s_root (..., M, M) upper triangular
    (the identity where ``ok`` is False).  ``L L^T - U U^T = L (I - W W^T) L^T``
    is positive definite iff ``I - W^T W`` is (the nonzero eigenvalues of
    ``W W^T`` and ``W^T W`` coincide).
    """
    m = u.shape[-1]
    w = ops.solve_lower_dense(low, u)
    lt, ok = ops.cholesky_flagged(ops.eye(m, w) - w.mT @ w)
    return w, lt.mT, ok


def downdate(
    ops: Ops, low: Array, w: Array, s_root: Array, out: Array, block: int | None = None
) -> None:
    """``out`` (lower) = the factor of ``L L^T - U U^T`` from :func:`downdate_check`'s W, S.

    ``out`` has the full batch shape and may be ``low``; its strict upper
    triangle is set to zero.  Entries whose check failed hold garbage.

    Block rows J from the bottom: the QR of ``[S; W_J]`` gives ``Q^T [S; W_J]
    = [S'; 0]``; ``Q^T`` applied to ``[X; R_J]`` (X: the M extra rows, zero
    left of J until then) moves R's block row into X's rows and back.  Only
    rows J and X mix, and X is zero left of the block, so ``R'_J`` stays zero
    left of the block but its diagonal block becomes dense; a QR of that
    block (an orthogonal map of the rows J alone, which keeps ``R'^T R'``)
    makes it triangular again.
    """
    n, m = low.shape[-1], w.shape[-1]
    block = block or PANEL
    ops.copy_lower(out, low, kernel=_rank1.copy_tri)
    r = out.mT
    batch = out.shape[:-2]
    x = ops.zeros((*batch, m, n), out)
    for start in reversed(range(0, n, block)):
        stop = min(start + block, n)
        width = stop - start
        panel = ops.concat([ops.broadcast_to(s_root, (*batch, m, m)), w[..., start:stop, :]], -2)
        q, t = ops.qr_complete(panel)
        s_root = t[..., :m, :]
        y = q.mT @ ops.concat([x[..., :, start:], r[..., start:stop, start:]], -2)
        x[..., :, start:] = y[..., :m, :]
        z, t = ops.qr_complete(y[..., m:, :width])
        signs = _signs(ops, t.diagonal(0, -2, -1))[..., :, None]
        r[..., start:stop, start:stop] = ops.where(ops.strict_lower_mask(width, t), 0.0, t * signs)
        if stop < n:
            r[..., start:stop, stop:] = (z.mT @ y[..., m:, width:]) * signs
