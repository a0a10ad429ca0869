"""Compiled rank-1 rotation sweeps for the Cholesky update and downdate.

These are the loops that cannot be level-3: one rank-1 modification of a
triangular factor costs O(N^2) flops and is bound by memory traffic, so each
kernel reads the input factor and writes the result in a single sweep (the
result may be the input itself, for an in-place update).  Derivations:
``docs/cholesky.md``.

Every sweep works on a stack of factors and comes in two memory orders, so
that the inner loop always runs along contiguous memory:

- ``*_rows``: the lower factor ``L`` addressed as ``L[i, j]``, ``j <= i``
  (a C-ordered lower factor, or the transpose of an F-ordered upper one);
- ``*_cols``: the same factor addressed through ``R = L^T`` as
  ``R[j, i] = L[i, j]`` (a C-ordered upper factor, or the transpose of an
  F-ordered lower one).

Arguments of :func:`sweep`: ``src`` (Bs, n, n) input factors, ``src_idx`` (B,)
the input factor of each output entry (broadcasting without copies), ``dst``
(B, n, n) output (may be ``src`` itself when ``inplace``), ``x`` (B, n) the
update vectors, scaled by ``sqrt(|multiplier|)`` (overwritten), ``down`` (B,)
true for a downdate, ``ok`` (B,) set to false where a downdate would not be
positive definite (such entries are not written, or receive a copy of the
input when not ``inplace``).  The triangle opposite the factor is set to zero
in ``dst``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .._runtime import threads
from .._runtime.jit import jit as _jit
from .._runtime.tuning import CHOLESKY_PARALLEL_COPY_MIN_ORDER as PARALLEL_COPY_MIN_ORDER
from .._runtime.tuning import RANK1_GROUP_ROWS, RANK1_SMALL_ORDER

#: Rows of the lower factor advanced together by the row-oriented update, so
#: that GROUP independent rotation chains overlap in the floating-point units.
GROUP = RANK1_GROUP_ROWS


_SERIAL = {"nogil": True, "fastmath": {"contract"}}


# --------------------------------------------------------------- row order
@_jit(**_SERIAL)
def _apply_update_row(src, dst, x, cs, sn, i, j0, j1):
    """Rotations j0..j1-1 applied to row i of the lower factor and to x[i]."""
    xi = x[i]
    for j in range(j0, j1):
        a = src[i, j]
        dst[i, j] = cs[j] * a + sn[j] * xi
        xi = cs[j] * xi - sn[j] * a
    x[i] = xi


@_jit(**_SERIAL)
def _update_rows_one(src, dst, x, cs, sn, xs):
    """Givens update of one lower factor, row by row, GROUP rows interleaved.

    Row i needs rotations 0..i-1 and forms rotation i at its diagonal, so a
    group of rows first applies every rotation formed before the group (GROUP
    independent recurrences in x), then finishes its own small triangle.
    """
    n = src.shape[0]
    for i0 in range(0, n, GROUP):
        g = min(GROUP, n - i0)
        if g == GROUP:
            for r in range(GROUP):
                xs[r] = x[i0 + r]
            for j in range(i0):
                cos = cs[j]
                sin = sn[j]
                for r in range(GROUP):
                    a = src[i0 + r, j]
                    dst[i0 + r, j] = cos * a + sin * xs[r]
                    xs[r] = cos * xs[r] - sin * a
            for r in range(GROUP):
                x[i0 + r] = xs[r]
        else:
            for r in range(g):
                _apply_update_row(src, dst, x, cs, sn, i0 + r, 0, i0)
        for r in range(g):
            i = i0 + r
            _apply_update_row(src, dst, x, cs, sn, i, i0, i)
            diag = src[i, i]
            rr = math.hypot(diag, x[i])
            cs[i] = diag / rr
            sn[i] = x[i] / rr
            dst[i, i] = rr
            for j in range(i + 1, n):
                dst[i, j] = 0.0


#: Largest order for which the row-order update runs on a scratch copy, column
#: by column: the factor then sits in L1, so the strided column reads are
#: cheap, rotation k+1 can start while step k still updates the rows below,
#: and the caller's memory is read and written once, row by row.
SMALL = RANK1_SMALL_ORDER


@_jit(**_SERIAL)
def _update_rows_small(src, dst, x, buf):
    """Givens update of a small lower factor read by rows; ``buf`` (>= n, >= n) scratch.

    ``sqrt(d^2 + x^2)``, with a fallback to ``hypot`` outside the range where
    the squares can neither overflow nor underflow.  Returns -1 (``dst`` not
    written) if the input's diagonal is not positive, else 1 if the result's
    diagonal is finite, 0 if not.  (The diagonal is checked on the scratch
    copy: read first from the caller's memory, its scattered entries cost
    about as much as the whole update.)
    """
    n = src.shape[0]
    for i in range(n):
        for j in range(i + 1):
            buf[i, j] = src[i, j]
    if not _diag_positive(buf[:n, :n]):
        return -1
    acc = 0.0
    for k in range(n):
        diag = buf[k, k]
        xk = x[k]
        rr = math.sqrt(diag * diag + xk * xk)
        if not 1e-150 < rr < 1e150:
            rr = math.hypot(diag, xk)
        inv = 1.0 / rr
        cos = diag * inv
        sin = xk * inv
        buf[k, k] = rr
        acc += rr * 0.0
        for i in range(k + 1, n):
            a = buf[i, k]
            xi = x[i]
            buf[i, k] = cos * a + sin * xi
            x[i] = cos * xi - sin * a
    for i in range(n):
        for j in range(i + 1):
            dst[i, j] = buf[i, j]
        for j in range(i + 1, n):
            dst[i, j] = 0.0
    return 1 if acc == 0.0 else 0


@_jit(**_SERIAL)
def _forward_rows_one(src, x, p):
    """p = L^-1 x for a lower factor read by rows (four partial sums per dot)."""
    n = src.shape[0]
    for i in range(n):
        s0 = s1 = s2 = s3 = 0.0
        j = 0
        while j + 4 <= i:
            s0 += src[i, j] * p[j]
            s1 += src[i, j + 1] * p[j + 1]
            s2 += src[i, j + 2] * p[j + 2]
            s3 += src[i, j + 3] * p[j + 3]
            j += 4
        while j < i:
            s0 += src[i, j] * p[j]
            j += 1
        p[i] = (x[i] - ((s0 + s1) + (s2 + s3))) / src[i, i]


@_jit(**_SERIAL)
def _downdate_rows_one(src, dst, cs, sn):
    """Apply precomputed downdate rotations; rows are independent of each other."""
    n = src.shape[0]
    for i in range(n):
        xx = 0.0
        for j in range(i, -1, -1):
            a = src[i, j]
            t = cs[j] * xx + sn[j] * a
            dst[i, j] = cs[j] * a - sn[j] * xx
            xx = t
        for j in range(i + 1, n):
            dst[i, j] = 0.0


# ------------------------------------------------------------ column order
@_jit(**_SERIAL)
def _update_cols_one(src, dst, x):
    """Givens update of R = L^T: step k rotates row k of R against x."""
    n = src.shape[0]
    for k in range(n):
        diag = src[k, k]
        rr = math.hypot(diag, x[k])
        cos = diag / rr
        sin = x[k] / rr
        for j in range(k):
            dst[k, j] = 0.0
        dst[k, k] = rr
        for i in range(k + 1, n):
            a = src[k, i]
            dst[k, i] = cos * a + sin * x[i]
            x[i] = cos * x[i] - sin * a


@_jit(**_SERIAL)
def _forward_cols_one(src, x, p):
    """p = R^-T x (= L^-1 x) by axpy steps along the rows of R; x is overwritten."""
    n = src.shape[0]
    for k in range(n):
        pk = x[k] / src[k, k]
        p[k] = pk
        for i in range(k + 1, n):
            x[i] -= pk * src[k, i]


@_jit(**_SERIAL)
def _downdate_cols_one(src, dst, cs, sn, xx):
    """Apply precomputed downdate rotations to R from its last row up."""
    n = src.shape[0]
    xx[:] = 0.0
    for i in range(n - 1, -1, -1):
        cos = cs[i]
        sin = sn[i]
        for j in range(i, n):
            a = src[i, j]
            t = cos * xx[j] + sin * a
            dst[i, j] = cos * a - sin * xx[j]
            xx[j] = t
        for j in range(i):
            dst[i, j] = 0.0


# ------------------------------------------------------------------ shared
@_jit(**_SERIAL)
def _downdate_rotations(p, cs, sn):
    """LINPACK's downdate rotations from p = L^-1 x; False if ||p|| >= 1 (or NaN).

    With ``alpha = sqrt(1 - ||p||^2)`` the rotations, generated from the last
    entry up, map ``(alpha, p)`` to ``(1, 0)``; ``alpha`` stays positive, so
    every cosine is positive and so is the new diagonal.
    """
    n = p.shape[0]
    norm2 = 0.0
    for i in range(n):
        norm2 += p[i] * p[i]
    if not norm2 < 1.0:
        return False
    alpha = math.sqrt(1.0 - norm2)
    for i in range(n - 1, -1, -1):
        scale = alpha + abs(p[i])
        a = alpha / scale
        b = p[i] / scale
        r = math.sqrt(a * a + b * b)
        cs[i] = a / r
        sn[i] = b / r
        alpha = scale * r
    return True


@_jit(**_SERIAL)
def copy_tri(src, dst, rows):
    """dst = the factor's triangle of src, zero elsewhere (contiguous runs, no branches)."""
    n = src.shape[0]
    for i in range(n):
        lo = 0 if rows else i
        hi = i + 1 if rows else n
        for j in range(lo):
            dst[i, j] = 0.0
        for j in range(lo, hi):
            dst[i, j] = src[i, j]
        for j in range(hi, n):
            dst[i, j] = 0.0


@_jit(**_SERIAL)
def _negate_tri(src, dst, start, stop, zero_above):
    """Rows start:stop of dst = minus the lower triangle of src, zero above
    unless ``zero_above`` is False (dst already zero there); dst may be src.
    True if those rows of the triangle are finite (x - x is 0 for finite x,
    NaN otherwise).

    The test is an integer OR, which the compiler vectorises (a floating-point
    sum would not be, without reordering): the pass runs at copy speed.
    """
    n = src.shape[0]
    bad = 0
    for i in range(start, stop):
        for j in range(i + 1):
            x = src[i, j]
            bad |= (x - x) != 0.0
            dst[i, j] = -x
        if zero_above:
            for j in range(i + 1, n):
                dst[i, j] = 0.0
    return bad == 0


def _triangle_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """Rows of an n x n lower triangle cut into ``parts`` runs of near-equal area
    (rows up to i hold (i + 1)(i + 2) / 2 entries: cut at n sqrt(k / parts))."""
    cuts = [0] + [int(n * math.sqrt(k / parts)) for k in range(1, parts)] + [n]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def negate_lower(dst: np.ndarray, src: np.ndarray, zero_above: bool = True) -> bool:
    """``dst`` (n, n) = minus the lower triangle of ``src``, zeros above, one pass.

    With ``zero_above=False`` the strict upper triangle of ``dst`` is left as
    it is (new memory from ``np.zeros``: its pages above the diagonal are then
    never touched).  Large triangles are copied by all of dplr's threads (the
    pass is bound by memory and, in new memory, by first-touch page faults).
    Returns True if the lower triangle of ``src`` is finite (checked in the
    same pass).
    """
    n = src.shape[0]
    parts = threads.num_workers() if n >= PARALLEL_COPY_MIN_ORDER else 1
    runs = _triangle_rows(n, parts)
    return all(threads.run_all(lambda r: bool(_negate_tri(src, dst, *r, zero_above)), runs))


@_jit(**_SERIAL)
def _sweep_one(src, dst, x, work, down, inplace, rows):
    """One rank-1 update or downdate of one factor (read by rows, or through R = L^T).

    Returns False (and leaves ``dst`` unwritten when ``inplace``, else a copy
    of the input) where a downdate would not be positive definite.
    """
    n = src.shape[0]
    cs, sn, p = work[0, :n], work[1, :n], work[2, :n]
    if not down:
        if rows:
            _update_rows_one(src, dst, x, cs, sn, work[2])
        else:
            _update_cols_one(src, dst, x)
        return True
    if rows:
        _forward_rows_one(src, x, p)
    else:
        _forward_cols_one(src, x, p)
    if not _downdate_rotations(p, cs, sn):
        if not inplace:
            copy_tri(src, dst, rows)
        return False
    if rows:
        _downdate_rows_one(src, dst, cs, sn)
    else:
        _downdate_cols_one(src, dst, cs, sn, p)
    return True


@_jit(**_SERIAL)
def _diag_finite(factor):
    acc = 0.0
    for i in range(factor.shape[0]):
        acc += factor[i, i] * 0.0
    return acc == 0.0


@_jit(**_SERIAL)
def _diag_positive(factor):
    """All diagonal entries > 0 (NaN is not); no early exit, so the loads overlap."""
    count = 0
    for i in range(factor.shape[0]):
        count += factor[i, i] > 0.0
    return count == factor.shape[0]


@_jit(**_SERIAL)
def _sweep_range(src, src_idx, dst, x, down, ok, fin, pos, inplace, rows, lo, hi):
    """Entries lo..hi-1 of :func:`sweep`; releases the GIL (threads split the batch)."""
    n = dst.shape[-1]
    work = np.empty((3, max(n, GROUP)), dtype=x.dtype)
    buf = np.empty((min(n, SMALL), min(n, SMALL)), dtype=x.dtype)
    for b in range(lo, hi):
        one_src, one_dst = src[src_idx[b]], dst[b]
        if rows and n <= SMALL and not down[b]:
            status = _update_rows_small(one_src, one_dst, x[b], buf)
            pos[b] = status >= 0
            ok[b] = status >= 0
            fin[b] = status == 1
            continue
        pos[b] = _diag_positive(one_src)
        if not pos[b]:  # not a Cholesky factor: the caller raises
            ok[b] = False
            fin[b] = False
            continue
        ok[b] = _sweep_one(one_src, one_dst, x[b], work, down[b], inplace, rows)
        fin[b] = _diag_finite(one_dst)


# Large batches of sweeps are split between dplr's threads
# (:func:`dplr._runtime.threads.batch_parts`: plain Python threads running a
# nogil kernel: nothing keeps spinning afterwards, unlike an OpenMP pool, which
# was measured to slow the caller's next multi-threaded BLAS call up to 20x).


def sweep(src, src_idx, dst, x, down, ok, inplace: bool, rows: bool):
    """One rank-1 update or downdate of every factor (see the module docstring).

    ``rows`` selects the memory order: the lower factor addressed by rows, or
    through ``R = L^T``.  Returns two boolean arrays, per factor: whether
    the result's diagonal is finite, and whether the input's diagonal is
    positive (factors where it is not are skipped: not written, ``ok`` false).
    """
    count = dst.shape[0]
    fin = np.empty(count, dtype=bool)
    pos = np.empty(count, dtype=bool)

    def run(part: slice) -> None:
        args = (src, src_idx, dst, x, down, ok, fin, pos, inplace, rows)
        _sweep_range(*args, part.start, part.stop)

    threads.run_all(run, threads.batch_parts(count))
    return fin, pos


@_jit(nogil=True, fastmath={"reassoc"})
def _tri_finite_one(factor, rows):
    """True if the triangle of factor is finite.

    ``v * 0`` is 0 for a finite v and NaN otherwise, so the sum is exact and
    may be reassociated (vectorised) freely.
    """
    n = factor.shape[0]
    acc = 0.0
    for i in range(n):
        lo = 0 if rows else i
        hi = i + 1 if rows else n
        row = factor[i]
        for j in range(lo, hi):
            acc += row[j] * 0.0
    return acc == 0.0


@_jit(nogil=True)
def _tri_finite_range(src, rows, out, lo, hi):
    for b in range(lo, hi):
        out[b] = _tri_finite_one(src[b], rows)


def tri_all_finite(src: np.ndarray, rows: bool) -> np.ndarray:
    """Per factor of src (B, n, n): True if its triangle (lower if ``rows``) is finite.

    The other triangle is not read.  Split over dplr's threads for a large
    batch, like :func:`sweep`.
    """
    count = src.shape[0]
    out = np.empty(count, dtype=bool)
    parts = threads.batch_parts(count)
    threads.run_all(lambda sl: _tri_finite_range(src, rows, out, sl.start, sl.stop), parts)
    return out
