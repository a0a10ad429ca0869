"""Cholesky factor of a low-rank modification: update, downdate, insert, delete.

Given a Cholesky factor of ``A`` (``A = L L^T``), these return the factor of
``A + U diag(multiplier) U^T`` in O(N^2 M) instead of O(N^3).  Derivations,
costs and the measured policy of ``method="auto"``: ``docs/cholesky.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .._errors import NotPositiveDefiniteError
from .._runtime.backend import Array, is_torch
from .._runtime.blas import single_threaded_blas
from .._validate import (
    all_finite,
    broadcast_batch,
    check_choice,
    check_cholesky_diagonal,
    int_in_range,
    not_finite_error,
    prepare,
    require_ndim,
    to_output,
)
from . import _blocked, _rank1
from ._policy import blas_thread_count, choose_method
from ._problem import Problem, check_triangle_finite, problem, square_factor

__all__ = ["cholesky_delete", "cholesky_downdate", "cholesky_insert", "cholesky_update"]

_METHODS = ("auto", "rank1", "blocked", "refactor")
_ERRORS = ("raise", "flag")


# ------------------------------------------------------------------ the paths
def _writable_target(pb: Problem) -> Array | None:
    """The caller's factor, as a lower view, if the result may be written into it."""
    src = pb.source
    same = src is pb.prep["factor"] if not pb.prep.torch else src.data_ptr() == pb.lower.data_ptr()
    if not same or tuple(pb.lower.shape[:-2]) != pb.batch:
        return None
    if pb.prep.torch:
        return None if src.requires_grad else pb.lower
    return pb.lower if pb.lower.flags.writeable else None


def _rank1_path(pb: Problem, target: Array | None, check_finite: bool, errors: str):
    """M compiled sweeps; returns (lower result, ok).

    In place only when no entry of the caller's array can be written before
    all are known to succeed: updates, or one downdate sweep of one factor
    (checked before it writes), or ``errors="flag"`` (a failing entry is
    never written).
    """
    if pb.prep.torch:
        raise ValueError(
            "method='rank1' runs compiled NumPy loops; for torch tensors use "
            "method='blocked' or 'auto' (dplr never moves data behind your back)"
        )
    n, m, batch = pb.n, pb.m, pb.batch
    low = pb.lower
    rows = low.strides[-1] <= low.strides[-2]
    orient = (lambda a: a) if rows else (lambda a: a.mT)
    bsize = int(np.prod(batch, dtype=np.int64))
    src = orient(low).reshape(-1, n, n)
    src_idx = np.broadcast_to(np.arange(src.shape[0]).reshape(low.shape[:-2]), batch).reshape(-1)
    weights = np.broadcast_to(pb.weights, (*batch, m)).reshape(bsize, m)
    x_all = np.broadcast_to(pb.u, (*batch, n, m)).reshape(bsize, n, m)
    if m > 1:  # updates first: every partial result stays positive definite
        order = np.argsort(weights < 0, axis=-1, kind="stable")
        weights = np.take_along_axis(weights, order, -1)
        x_all = np.take_along_axis(x_all, order[:, None, :], -1)
    x_all = x_all * np.sqrt(np.abs(weights))[:, None, :]
    one_pass = m == 1 and (bsize == 1 or errors == "flag")
    direct = target is not None and (one_pass or not (weights < 0).any())
    if direct:  # the kernels skip factors without a positive diagonal; check first here
        check_cholesky_diagonal(low, check_finite)
        if check_finite:
            check_triangle_finite(pb)
        out = target
        dst = src
    else:
        out = np.empty((*batch, n, n), dtype=low.dtype)
        out = out if rows else out.mT
        dst = orient(out).reshape(bsize, n, n)
    ok = np.ones(bsize, dtype=bool)
    ok_j = np.empty(bsize, dtype=bool)
    for j in range(m):
        x = np.ascontiguousarray(x_all[:, :, j])
        first = j == 0
        read, read_idx = (src, src_idx) if first else (dst, np.arange(bsize))
        down = weights[:, j] < 0
        fin, pos = _rank1.sweep(read, read_idx, dst, x, down, ok_j, direct or not first, rows)
        if first and not pos.all():  # the input's diagonal, read by the kernel
            check_cholesky_diagonal(low, check_finite)
        ok &= ok_j
    if check_finite and not direct:
        bad = ~ok | ~fin
        if bad.any() and not _rank1.tri_all_finite(src[src_idx[bad]], rows).all():
            raise not_finite_error("factor")
    return out, ok.reshape(batch)


def _blocked_path(pb: Problem, target: Array | None, check_finite: bool, chunk: int | None):
    """Orthogonal reductions: the update of ``[R; U^T]``, then the blocked LINPACK downdate.

    Positive weights go first (every intermediate matrix is then at least as
    positive as the result).  A downdate is checked (``I - W^T W`` positive
    definite) before ``target`` is written, and written there only when every
    batch entry passed; returns ``(lower result, ok)``.
    """
    ops, low, n = pb.ops, pb.lower, pb.n
    up, down = _split_weights(pb)
    # A LAPACK update into new memory checks the triangle while copying it (one
    # pass over the factor instead of two); everything else checks it first.
    fused = (
        check_finite and down is None and target is None and _blocked.uses_lapack(ops, low, chunk)
    )
    if check_finite and not fused:
        check_triangle_finite(pb)
    shape = (*pb.batch, n, n)
    with _blas_threads(pb, blas_thread_count(n)):
        if down is None:
            # New memory for ?tpqrt comes zero-filled: the pages above the
            # diagonal are then never touched (the copy is bound by page faults).
            zeroed = target is None and _blocked.uses_lapack(ops, low, chunk)
            out = target if target is not None else _new_lower(pb, shape, zeroed)
            if not _blocked.update(ops, low, up, out, chunk, check_finite=fused, out_zero=zeroed):
                raise not_finite_error("factor")
            return out, ops.zeros(pb.batch, low) == 0
        base = low
        if up is not None:  # into scratch: the caller's memory waits for the check
            base = _new_lower(pb, shape)
            _blocked.update(ops, low, up, base, chunk)
        w, s_root, ok = _blocked.downdate_check(ops, base, down)
        ok = _expand(ops, ok, pb.batch)
        out = target if target is not None and bool(ok.all()) else None
        if out is None:
            out = base if base is not low else _new_lower(pb, shape)
        with np.errstate(all="ignore"):  # failed entries may overflow; they are discarded
            _blocked.downdate(ops, base, w, s_root, out, chunk)
    return out, ok


def _split_weights(pb: Problem) -> tuple[Array | None, Array | None]:
    """``U sqrt(max(w, 0))`` and ``U sqrt(max(-w, 0))`` over the columns that need them."""
    ops = pb.ops
    parts = []
    for sign in (1.0, -1.0):
        sw = pb.weights * sign
        cols = (sw > 0).reshape(-1, pb.m).any(0)
        if not bool(cols.any()):
            parts.append(None)
            continue
        scale = ops.where(sw > 0, sw, 0.0) ** 0.5
        parts.append((pb.u * scale[..., None, :])[..., cols])
    return parts[0], parts[1]


def _new_lower(pb: Problem, shape: tuple[int, ...], zeroed: bool = False) -> Array:
    """A result in the memory order the kernels write fastest (C, lower):
    uninitialised, or filled with zeros when ``zeroed``."""
    return (pb.ops.zeros if zeroed else pb.ops.empty)(shape, pb.lower)


def _refactor_path(pb: Problem) -> tuple[Array, Array]:
    """Form ``L L^T + U diag(w) U^T`` and factor it again: O(N^3)."""
    ops = pb.ops
    with _blas_threads(pb, blas_thread_count(pb.n)):
        low = _blocked.tril_block(ops, pb.lower)
        b = low @ low.mT + (pb.u * pb.weights[..., None, :]) @ pb.u.mT
        lt, ok = ops.cholesky_flagged(b)
    return lt, _expand(ops, ok, pb.batch)


def _expand(ops, ok, batch):
    return ops.broadcast_to(ok, batch) if tuple(ok.shape) != tuple(batch) else ok


def _blas_threads(pb: Problem, threads: int | None):
    if pb.prep.torch or threads != 1:
        return contextlib.nullcontext()
    return single_threaded_blas()


def _unchanged(pb: Problem, errors: str, check_finite: bool):
    """N = 0 or M = 0: the input factor, checked, as a new array of the batch shape."""
    ops = pb.ops
    if pb.n:
        check_cholesky_diagonal(pb.lower, check_finite)
        if check_finite:
            check_triangle_finite(pb)
    full = ops.broadcast_to(pb.lower, (*pb.batch, pb.n, pb.n))
    out = _blocked.tril_block(ops, full)
    ok = ops.zeros(pb.batch, pb.lower) == 0
    return _finish(pb, out, ok, None, errors)


# ---------------------------------------------------------------- dispatching
def _failure(ok: Array, what: str) -> NotPositiveDefiniteError:
    mask = ok.cpu().numpy() if is_torch(ok) else ok
    return NotPositiveDefiniteError.from_mask(mask, what, "the input factor is unchanged")


def _finish(pb: Problem, out, ok, target, errors: str):
    """Raise or flag failures, restore failed entries, write into the target."""
    ops = pb.ops
    all_ok = bool(ok.all())
    if not all_ok and errors == "raise":
        raise _failure(ok, "the modified matrix")
    if out is not target:
        if not all_ok:
            full = ops.broadcast_to(pb.lower, (*pb.batch, pb.n, pb.n))
            out[~ok] = _blocked.tril_block(ops, full[~ok])
        if target is not None:
            target[ok] = out[ok]
            out = target
    result = out if pb.is_lower else out.mT
    result = to_output(result, pb.prep)
    return (result, ok) if errors == "flag" else result


def _modify(factor, u, multiplier, sign, *, lower, method, errors, overwrite, check_finite,
            chunk_size=None):  # fmt: skip
    check_choice("method", method, _METHODS)
    check_choice("errors", errors, _ERRORS)
    pb = problem(factor, u, multiplier, sign, lower, check_finite)
    target = _writable_target(pb) if overwrite else None
    bsize = int(np.prod(pb.batch, dtype=np.int64))
    if pb.n == 0 or pb.m == 0:  # nothing to modify: the factor (its triangle), as a new array
        return _unchanged(pb, errors, check_finite)
    if method == "auto":
        method = choose_method(pb.n, pb.m, bsize, pb.prep.torch)
    if method != "rank1":
        check_cholesky_diagonal(pb.lower, check_finite)
    if method == "rank1":
        out, ok = _rank1_path(pb, target, check_finite, errors)
    elif method == "blocked":
        out, ok = _blocked_path(pb, target, check_finite, chunk_size)
    else:
        if check_finite:
            check_triangle_finite(pb)
        out, ok = _refactor_path(pb)
    return _finish(pb, out, ok, target, errors)


# ------------------------------------------------------------------ public API
def cholesky_update(
    factor: Any, u: Any, multiplier: Any = 1.0, *, lower: bool = True, method: str = "auto",
    errors: str = "raise", overwrite: bool = False, check_finite: bool = True,
) -> Any:  # fmt: skip
    """Cholesky factor of ``A + U diag(multiplier) U^T`` from a factor of ``A``.

    Parameters
    ----------
    factor : (..., N, N) array_like
        Cholesky factor of A: lower (``A = L L^T``) or, with ``lower=False``,
        upper (``A = R^T R``).  Only that triangle is read.  NumPy array or
        torch tensor (any device).
    u : (N,) or (..., N, M) array_like
        One vector (only a 1-D ``u`` is a vector) or a stack of N x M
        matrices, the rule of ``numpy.linalg.solve`` in NumPy 2.  A batch of
        rank-1 updates is ``u[..., None]``.  M = 0 returns the factor.
    multiplier : float or (..., M) array_like, default 1.0
        One weight per column of ``u`` (a scalar weights them all); leading
        axes broadcast with the batch.  One weight per batch entry is
        ``multiplier[..., None]``.  A shape that could mean either (last axis
        of length M equal to the trailing batch axes) raises ``ValueError``.
        Negative weights downdate; signs may mix.
    lower : bool, default True
        Whether ``factor`` (and the result) is lower or upper triangular.
    method : {"auto", "rank1", "blocked", "refactor"}, default "auto"
        ``"rank1"``: M compiled rotation sweeps (NumPy only); ``"blocked"``:
        block orthogonal reductions, all matrix products (updates by
        LAPACK's triangular-pentagonal QR of ``[L^T; U^T]``);
        ``"refactor"``: form the modified matrix and factor it (O(N^3));
        ``"auto"`` picks one from N, M and the batch size (measured policy).
    errors : {"raise", "flag"}, default "raise"
        On a result that is not positive definite: raise
        :class:`NotPositiveDefiniteError`, or return ``(new_factor, ok)``
        with ``ok`` a boolean array of the batch shape; failed entries then
        hold the input factor.
    overwrite : bool, default False
        Allow a successful call to write the result into ``factor``'s memory
        (only when no dtype conversion or batch broadcasting is needed).
        On failure the caller's arrays are never modified.
    check_finite : bool, default True
        Raise if an input holds NaN or Inf.

    Returns
    -------
    new_factor : (..., N, N) array
        The factor of the modified matrix, same kind (lower/upper) as the
        input, positive diagonal, zeros in the other triangle; same library,
        device and promoted dtype as the inputs.
    ok : (...) bool array
        Only with ``errors="flag"``.

    Raises
    ------
    NotPositiveDefiniteError
        With ``errors="raise"``, if the modified matrix is not positive
        definite for some batch entries (listed in ``.batch_indices``).
    ValueError
        Non-square ``factor``, shapes that do not match or broadcast, a
        diagonal entry of ``factor`` that is not positive, NaN or Inf, an
        unknown ``method`` or ``errors``, or ``method="rank1"`` with torch.
    TypeError
        Complex input, or NumPy and torch mixed.

    Notes
    -----
    Rank 1: LINPACK's rotations, O(N^2), one sweep that reads the input and
    writes the result; a downdate first solves ``L p = u`` and is positive
    definite iff ``||p|| < 1``.  Rank M, blocked: the update is the QR
    factorisation ``Q^T [L^T; U^T] = [L'^T; 0]`` that keeps the triangle,
    about ``2 M N^2`` flops; the downdate solves ``W = L^-1 U``, checks that
    ``I - W^T W`` is positive definite, and rotates ``[W; S]`` into M extra
    rows block by block (LINPACK's algorithm in blocks), about ``3 M N^2``
    flops.  Every method is backward stable: ``||L' L'^T - B|| / ||B||``
    stays within a small multiple of eps however ill-conditioned L is.
    Failure is detected before the caller's memory is written.  Not
    differentiable (torch autograd does not track it).  See
    ``docs/cholesky.md``.

    From TensorFlow Probability: ``tfp.math.cholesky_update(chol,
    update_vector, multiplier)`` with ``chol`` (..., N, N), ``update_vector``
    (..., N) and ``multiplier`` (...) is
    ``cholesky_update(chol, update_vector[..., None], multiplier[..., None])``.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((50, 50)); a = x @ x.T + 50 * np.eye(50)
    >>> u = rng.standard_normal((50, 3))
    >>> new = dplr.cholesky_update(np.linalg.cholesky(a), u)
    >>> np.allclose(new, np.linalg.cholesky(a + u @ u.T))
    True
    """
    return _modify(factor, u, multiplier, 1.0, lower=lower, method=method, errors=errors,
                   overwrite=overwrite, check_finite=check_finite)  # fmt: skip


def cholesky_downdate(
    factor: Any, u: Any, multiplier: Any = 1.0, *, lower: bool = True, method: str = "auto",
    errors: str = "raise", overwrite: bool = False, check_finite: bool = True,
) -> Any:  # fmt: skip
    """Cholesky factor of ``A - U diag(multiplier) U^T``; see :func:`cholesky_update`.

    Same arguments, results and errors as :func:`cholesky_update` with the
    multiplier negated.  Raises :class:`NotPositiveDefiniteError` (or flags
    the entry) when the result would not be positive definite, e.g. when
    ``||L^-1 u|| >= 1`` for a rank-1 downdate; the input is then untouched,
    also with ``overwrite=True``.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> a = np.array([[4.0, 2.0], [2.0, 3.0]]); u = np.array([1.0, 1.0])
    >>> new = dplr.cholesky_downdate(np.linalg.cholesky(a), u)
    >>> np.allclose(new @ new.T, a - np.outer(u, u))
    True
    >>> dplr.cholesky_downdate(np.linalg.cholesky(a), 3 * u, errors="flag")[1]
    array(False)
    """
    return _modify(factor, u, multiplier, -1.0, lower=lower, method=method, errors=errors,
                   overwrite=overwrite, check_finite=check_finite)  # fmt: skip


def _factor_only(factor: Any, lower: bool, check_finite: bool, extra: dict | None = None):
    prep = prepare({"factor": factor, **(extra or {})}, check_finite=False)
    f = prep["factor"]
    square_factor(f, allow_empty=False)
    low = f if lower else f.mT
    pb = Problem(low, low[..., :1], low[..., 0, :1], tuple(f.shape[:-2]), prep, factor, lower)
    if check_finite:
        check_triangle_finite(pb)
    check_cholesky_diagonal(low, check_finite)
    return pb


def cholesky_delete(
    factor: Any, index: int, count: int = 1, *, lower: bool = True, check_finite: bool = True
) -> Any:
    """Factor of A with rows and columns ``index .. index+count-1`` removed.

    Parameters
    ----------
    factor : (..., N, N) array_like
        Lower (or, with ``lower=False``, upper) Cholesky factor of A.
    index : int
        First row/column to remove, ``0 <= index <= N - count``.
    count : int, default 1
        Number of consecutive rows/columns to remove, ``1 <= count < N``.
    lower, check_finite : bool
        As in :func:`cholesky_update`.

    Returns
    -------
    new_factor : (..., N - count, N - count) array
        Same kind, library, device and dtype as the input.

    Raises
    ------
    ValueError
        ``index`` or ``count`` out of range, bad ``factor`` (see
        :func:`cholesky_update`).

    Notes
    -----
    With ``L = [[L11, 0, 0], [L21, L22, 0], [L31, L32, L33]]`` split at the
    removed block, the new factor is ``[[L11, 0], [L31, L33']]`` where
    ``L33' L33'^T = L33 L33^T + L32 L32^T``: a rank-``count`` update of the
    trailing block (:func:`cholesky_update`), O((N - index)^2 count).  A
    sum of positive semidefinite terms cannot fail.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((6, 6)); a = x @ x.T + 6 * np.eye(6)
    >>> new = dplr.cholesky_delete(np.linalg.cholesky(a), 2, count=2)
    >>> keep = [0, 1, 4, 5]
    >>> np.allclose(new, np.linalg.cholesky(a[np.ix_(keep, keep)]))
    True
    """
    pb = _factor_only(factor, lower, check_finite)
    n, low, ops = pb.n, pb.lower, pb.ops
    if n == 1:
        raise ValueError(
            "'factor' is 1 x 1: deleting its only row and column leaves nothing; "
            "cholesky_delete needs N >= 2 (at least one row must stay)"
        )
    count = int_in_range("count", count, 1, n - 1)
    k = int_in_range("index", index, 0, n - count)
    e = k + count
    if k == 0:  # only the trailing block: the update reads it and writes its result once
        new = cholesky_update(low[..., e:, e:], low[..., e:, :e], check_finite=False)
        return to_output(new if lower else new.mT, pb.prep)
    new = ops.empty((*pb.batch, n - count, n - count), low)
    ops.copy_lower(new[..., :k, :k], low[..., :k, :k], kernel=_rank1.copy_tri)
    new[..., :k, k:] = 0.0
    new[..., k:, :k] = low[..., e:, :k]
    if e < n:  # the update runs in place on the copied block (it zeroes the upper part)
        new[..., k:, k:] = low[..., e:, e:]
        _in_place(cholesky_update, new[..., k:, k:], low[..., e:, k:e])
    return to_output(new if lower else new.mT, pb.prep)


def _in_place(fn, block: Array, u: Array, **kwargs) -> Array:
    """``fn(block, u, overwrite=True)``; the flags (or None), the result always in ``block``."""
    out = fn(block, u, overwrite=True, check_finite=False, **kwargs)
    res, ok = out if isinstance(out, tuple) else (out, None)
    same = res.data_ptr() == block.data_ptr() if is_torch(res) else res is block
    if not same and not (isinstance(res, np.ndarray) and np.may_share_memory(res, block)):
        block[...] = res  # not expected: the call could not write in place
    return ok


def cholesky_insert(
    factor: Any, index: int, cols: Any, *, lower: bool = True, errors: str = "raise",
    check_finite: bool = True,
) -> Any:  # fmt: skip
    """Factor of the matrix A enlarged by p rows and columns at ``index``.

    Parameters
    ----------
    factor : (..., N, N) array_like
        Lower (or, with ``lower=False``, upper) Cholesky factor of A.
    index : int
        Position of the first new row/column in the enlarged matrix,
        ``0 <= index <= N``.
    cols : (..., N + p, p) array_like
        The p new columns of the enlarged (N + p) x (N + p) matrix, rows in
        their final order (rows ``index .. index+p-1`` hold the new p x p
        diagonal block, of which the lower triangle is read).
    lower, check_finite : bool
        As in :func:`cholesky_update`.
    errors : {"raise", "flag"}, default "raise"
        As in :func:`cholesky_update`; failed entries of a flagged result are
        NaN (there is no input factor of the new size to fall back to).

    Returns
    -------
    new_factor : (..., N + p, N + p) array
    ok : (...) bool array
        Only with ``errors="flag"``.

    Raises
    ------
    NotPositiveDefiniteError
        If the enlarged matrix is not positive definite (``errors="raise"``).
    ValueError
        ``index`` out of range, ``cols`` of the wrong shape, bad ``factor``.

    Notes
    -----
    Split the old factor at ``index``: ``L = [[L11, 0], [L31, L33]]``.  The
    new rows are ``L21 = (L11^-1 a12)^T``, ``L22 = chol(a22 - L21 L21^T)``,
    ``L32 = (a32 - L31 L21^T) L22^-T``, and the trailing block is the
    downdate ``L33' L33'^T = L33 L33^T - L32 L32^T``
    (:func:`cholesky_downdate`).  O(N^2 p).

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(1)
    >>> x = rng.standard_normal((7, 7)); big = x @ x.T + 7 * np.eye(7)
    >>> keep = [0, 1, 2, 5, 6]
    >>> small = np.linalg.cholesky(big[np.ix_(keep, keep)])
    >>> new = dplr.cholesky_insert(small, 3, big[:, 3:5])
    >>> np.allclose(new, np.linalg.cholesky(big))
    True
    """
    check_choice("errors", errors, _ERRORS)
    pb = _factor_only(factor, lower, check_finite, {"cols": cols})
    n, low, ops = pb.n, pb.lower, pb.ops
    new_cols = pb.prep["cols"]
    require_ndim("cols", new_cols, 2, "(..., N + p, p)")
    p = new_cols.shape[-1]
    if p == 0 or new_cols.shape[-2] != n + p:
        raise ValueError(
            f"'cols' must have shape (..., {n} + p, p) with p >= 1 to match 'factor' "
            f"{tuple(pb.lower.shape)}; got {tuple(new_cols.shape)}"
        )
    if check_finite and not all_finite(new_cols):
        raise not_finite_error("cols")
    k = int_in_range("index", index, 0, n)
    batch = broadcast_batch({"factor": pb.batch, "cols": tuple(new_cols.shape[:-2])})
    a12, a22, a32 = new_cols[..., :k, :], new_cols[..., k : k + p, :], new_cols[..., k + p :, :]
    l11, l31 = low[..., :k, :k], low[..., k:, :k]
    x = ops.solve_lower_dense(l11, a12)  # (..., k, p): L21 = x^T
    l22, ok = ops.cholesky_flagged(a22 - x.mT @ x)
    l32 = ops.solve_lower_dense(l22, (a32 - l31 @ x).mT).mT
    new = ops.empty((*batch, n + p, n + p), low)
    if k < n:  # in place on the copied block; a failed entry is left as copied
        new[..., k + p :, k + p :] = low[..., k:, k:]
        ok = ok & _in_place(cholesky_downdate, new[..., k + p :, k + p :], l32, errors="flag")
    ops.copy_lower(new[..., :k, :k], l11, kernel=_rank1.copy_tri)
    new[..., :k, k:] = 0.0
    new[..., k : k + p, :k] = x.mT
    new[..., k : k + p, k : k + p] = l22
    new[..., k : k + p, k + p :] = 0.0
    new[..., k + p :, :k] = l31
    new[..., k + p :, k : k + p] = l32
    ok = _expand(ops, ok, batch)
    if not bool(ok.all()):
        if errors == "raise":
            raise _failure(ok, "the enlarged matrix")
        new[~ok] = float("nan")
    result = to_output(new if lower else new.mT, pb.prep)
    return (result, ok) if errors == "flag" else result
