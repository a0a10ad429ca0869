"""The batched Cholesky modifications over Dask arrays of factors.

Each function takes Dask (or NumPy) arrays whose leading axes are batch axes,
and returns lazy Dask arrays: one call of the in-memory function of
:mod:`dplr` per block of the batch, through :func:`dask.array.apply_gufunc`.
The core dimensions (the N x N factor, the N x M update) are rechunked to one
chunk; the batch axes keep the caller's chunks.

Threads: a worker process runs its blocks with dplr's thread pool
(``DPLR_NUM_THREADS``) and OpenBLAS; keep processes x threads within the
cores, e.g. ``LocalCluster(n_workers=2, threads_per_worker=1,
env=worker_env(1))`` on 2 cores (``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import dplr

from .._errors import NotPositiveDefiniteError
from ..cholesky._policy import choose_method

__all__ = [
    "cholesky_delete",
    "cholesky_downdate",
    "cholesky_insert",
    "cholesky_update",
    "worker_env",
]

_ERRORS = ("raise", "flag")


def worker_env(threads: int = 1) -> dict[str, str]:
    """Environment variables that give a worker process ``threads`` compute threads.

    Parameters
    ----------
    threads : int, default 1
        Threads per worker process for dplr's pool and for BLAS.  Choose
        ``n_workers * threads <= cores``.

    Returns
    -------
    env : dict of str to str
        ``DPLR_NUM_THREADS`` and the BLAS/OpenMP thread variables, for the
        ``env=`` argument of ``distributed.LocalCluster`` (or a worker's
        environment).

    Examples
    --------
    >>> from dplr.distributed.dask import worker_env
    >>> worker_env(2)["DPLR_NUM_THREADS"]
    '2'
    """
    if int(threads) < 1:
        raise ValueError(f"'threads' must be a positive integer; got {threads!r}")
    value = str(int(threads))
    names = ("DPLR_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return dict.fromkeys(names, value)


def cholesky_update(factor: Any, u: Any, multiplier: Any = 1.0, *, lower: bool = True,
                    method: str = "auto", errors: str = "raise",
                    check_finite: bool = True) -> Any:  # fmt: skip
    """:func:`dplr.cholesky_update` block by block over a Dask array of factors.

    Parameters
    ----------
    factor : (..., N, N) dask.array.Array or array_like
        Cholesky factors, chunked along the batch axes (...).
    u : (N,) or (..., N, M) dask.array.Array or array_like
        One vector for every factor, or M columns per factor.
    multiplier : float or (..., M) array_like, default 1.0
        Weight of each column (negative: downdate).
    lower, check_finite
        As in :func:`dplr.cholesky_update`.
    method : {"auto", "rank1", "blocked", "refactor"}, default "auto"
        ``"auto"`` is resolved once, from N, M and the whole batch size, so
        that every block runs the method the in-memory call would.
    errors : {"raise", "flag"}, default "raise"
        ``"raise"``: computing the result raises
        :class:`dplr.NotPositiveDefiniteError` whose ``batch_indices`` are
        indices into the whole batch.  ``"flag"``: return ``(factor, ok)``,
        ``ok`` a lazy boolean array of the batch shape, chunked like it.

    Returns
    -------
    new_factor : (..., N, N) dask.array.Array
    ok : (...) dask.array.Array of bool
        Only with ``errors="flag"``.

    Raises
    ------
    ValueError
        Bad ``errors`` or shapes (at once); the in-memory function's errors
        when the result is computed.
    NotPositiveDefiniteError
        When computed, with ``errors="raise"``, if any entry fails.

    Notes
    -----
    One task per block: O(N^2 M) per factor as in memory; each block reads
    its factors, never writes them.  Results are bit-identical to one
    in-memory call on the whole batch (same method, same kernels per entry).

    Examples
    --------
    >>> import numpy as np, dask.array as da, dplr
    >>> from dplr.distributed import dask as dd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((6, 5, 5)); a = x @ x.mT + 5 * np.eye(5)
    >>> L = da.from_array(np.linalg.cholesky(a), chunks=(2, 5, 5))
    >>> u = rng.standard_normal((6, 5, 1))
    >>> new = dd.cholesky_update(L, u).compute(scheduler="synchronous")
    >>> np.allclose(new @ new.mT, a + u @ u.mT)
    True
    """
    return _modify(dplr.cholesky_update, factor, u, multiplier, lower=lower, method=method,
                   errors=errors, check_finite=check_finite)  # fmt: skip


def cholesky_downdate(factor: Any, u: Any, multiplier: Any = 1.0, *, lower: bool = True,
                      method: str = "auto", errors: str = "raise",
                      check_finite: bool = True) -> Any:  # fmt: skip
    """:func:`dplr.cholesky_downdate` block by block; see :func:`cholesky_update`.

    Parameters
    ----------
    factor, u, multiplier, lower, method, errors, check_finite
        As in :func:`cholesky_update`.

    Returns
    -------
    new_factor : (..., N, N) dask.array.Array
    ok : (...) dask.array.Array of bool
        Only with ``errors="flag"``; failed entries hold the input factor.

    Raises
    ------
    NotPositiveDefiniteError
        When computed, with ``errors="raise"``, naming every failed entry
        by its index in the whole batch; nothing is returned and no input
        is modified.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from dplr.distributed import dask as dd
    >>> L = da.from_array(np.stack([np.eye(3)] * 4), chunks=(2, 3, 3))
    >>> u = np.zeros((4, 3, 1)); u[3, 0, 0] = 2.0              # entry 3: 1 - 4 < 0
    >>> new, ok = dd.cholesky_downdate(L, u, errors="flag")
    >>> ok.compute(scheduler="synchronous").tolist()
    [True, True, True, False]
    """
    return _modify(dplr.cholesky_downdate, factor, u, multiplier, lower=lower, method=method,
                   errors=errors, check_finite=check_finite)  # fmt: skip


def cholesky_insert(factor: Any, index: int, cols: Any, *, lower: bool = True,
                    errors: str = "raise", check_finite: bool = True) -> Any:  # fmt: skip
    """:func:`dplr.cholesky_insert` block by block over a Dask array of factors.

    Parameters
    ----------
    factor : (..., N, N) dask.array.Array or array_like
    index : int
        Position of the first new row and column, ``0 <= index <= N``.
    cols : (..., N + p, p) dask.array.Array or array_like
        The new columns, as in :func:`dplr.cholesky_insert`.
    lower, errors, check_finite
        As in :func:`cholesky_update` (failed entries of a flagged result are NaN).

    Returns
    -------
    new_factor : (..., N + p, N + p) dask.array.Array
    ok : (...) dask.array.Array of bool
        Only with ``errors="flag"``.

    Raises
    ------
    NotPositiveDefiniteError
        When computed, as in :func:`cholesky_downdate`.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from dplr.distributed import dask as dd
    >>> L = da.from_array(np.stack([np.eye(2)] * 4), chunks=(2, 2, 2))
    >>> cols = np.zeros((4, 3, 1)); cols[:, 2, 0] = 4.0       # new diagonal entry 4
    >>> new = dd.cholesky_insert(L, 2, cols).compute(scheduler="synchronous")
    >>> np.allclose(new, np.diag([1.0, 1.0, 2.0]))
    True
    """
    _check_errors(errors)
    arrays, _ = _operands((factor, 2), (cols, 2))

    def block(f, c):
        return dplr.cholesky_insert(f, index, c, lower=lower, errors="flag",
                                    check_finite=check_finite)  # fmt: skip

    return _apply(block, "(n,n),(q,p)", "(q,q)", arrays, errors)


def cholesky_delete(factor: Any, index: int, count: int = 1, *, lower: bool = True,
                    check_finite: bool = True) -> Any:  # fmt: skip
    """:func:`dplr.cholesky_delete` block by block over a Dask array of factors.

    Parameters
    ----------
    factor : (..., N, N) dask.array.Array or array_like
    index, count : int
        The rows and columns ``index .. index+count-1`` go.
    lower, check_finite
        As in :func:`dplr.cholesky_delete`.

    Returns
    -------
    new_factor : (..., N - count, N - count) dask.array.Array

    Raises
    ------
    ValueError
        When computed: ``index`` or ``count`` out of range, a bad factor.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from dplr.distributed import dask as dd
    >>> L = da.from_array(np.stack([np.diag([1.0, 2.0, 3.0])] * 4), chunks=(2, 3, 3))
    >>> new = dd.cholesky_delete(L, 1).compute(scheduler="synchronous")
    >>> np.allclose(new, np.diag([1.0, 3.0]))
    True
    """
    import dask.array as da

    (f,), _ = _operands((factor, 2))
    n = f.shape[-1]
    if not 1 <= count < n or not 0 <= index <= n - count:
        raise ValueError(f"'index' and 'count' must satisfy 0 <= index <= N - count, "
                         f"1 <= count < N = {n}; got index={index}, count={count}")  # fmt: skip
    return da.apply_gufunc(
        lambda block: dplr.cholesky_delete(block, index, count, lower=lower,
                                           check_finite=check_finite),
        "(n,n)->(p,p)", f, output_sizes={"p": n - count}, output_dtypes=f.dtype,
    )  # fmt: skip


# ----------------------------------------------------------------------- the machinery
def _check_errors(errors: str) -> None:
    if errors not in _ERRORS:
        raise ValueError(f"'errors' must be one of {_ERRORS}; got {errors!r}")


def _operands(*pairs: tuple[Any, int]) -> tuple[list[Any], tuple[int, ...]]:
    """Dask arrays, core axes in one chunk, batch axes chunked alike; the batch shape.

    The batch chunks are those of the operand with the most batch entries
    (the factors, usually); other operands follow them, axis by axis from
    the right, and broadcast where their length is 1.
    """
    import dask.array as da

    arrays = [(da.asarray(x), core) for x, core in pairs]
    for arr, core in arrays:
        if arr.ndim < core:
            raise ValueError(f"an operand of shape {arr.shape} has fewer than {core} axes")
    batch = tuple(np.broadcast_shapes(*(a.shape[: a.ndim - c] for a, c in arrays)))
    ref, ref_core = max(arrays, key=lambda pair: np.prod(pair[0].shape[: pair[0].ndim - pair[1]]))
    ref_chunks = ref.chunks[: ref.ndim - ref_core]
    out = []
    for arr, core in arrays:
        nb = arr.ndim - core
        chunks: dict[int, Any] = {arr.ndim - 1 - i: -1 for i in range(core)}
        for axis in range(nb):
            back = nb - axis  # position from the right among the batch axes
            if arr.shape[axis] != 1 and back <= len(ref_chunks):
                chunks[axis] = ref_chunks[len(ref_chunks) - back]
        out.append(arr.rechunk(chunks))
    return out, batch


def _modify(fn: Callable, factor, u, multiplier, *, lower, method, errors, check_finite):
    """update / downdate: signature ``(n,n),(n,m)[,(m)]->(n,n),()``."""
    _check_errors(errors)
    if np.ndim(u) == 1:  # one vector for every factor
        u = np.asarray(u)[:, None]
    weights = np.ndim(multiplier) > 0
    pairs = [(factor, 2), (u, 2)] + ([(multiplier, 1)] if weights else [])
    arrays, batch = _operands(*pairs)
    n, m = arrays[0].shape[-1], arrays[1].shape[-1]
    if method == "auto":  # as the in-memory call on the whole batch would choose
        method = choose_method(int(n), int(m), int(np.prod(batch, dtype=np.int64)), False)

    def block(f, x, *rest):
        w = rest[0] if weights else multiplier
        return fn(f, x, w, lower=lower, method=method, errors="flag", check_finite=check_finite)

    head = "(n,n),(n,m)" + (",(m)" if weights else "")
    return _apply(block, head, "(n,n)", arrays, errors)


def _apply(block: Callable, head: str, out: str, arrays: list, errors: str):
    """``block`` (which returns the result and its mask) over the blocks; flag or raise."""
    import dask.array as da

    dtype = np.result_type(*(a.dtype for a in arrays[:2]), np.float32)
    result, ok = da.apply_gufunc(block, f"{head}->{out},()", *arrays,
                                 output_dtypes=(dtype, bool))  # fmt: skip
    if errors == "flag":
        return result, ok
    # Every block of the result waits for the whole mask (one byte per factor):
    # the first task to raise names every failed entry of the batch.
    letters = "abcdefghijklmnopqrstuvwxyz"
    out_ind = letters[: result.ndim]
    mask_ind = letters[::-1][: ok.ndim]
    return da.blockwise(_raise_or_pass, out_ind, result, out_ind, ok, mask_ind,
                        concatenate=True, dtype=dtype, meta=result._meta)  # fmt: skip


def _raise_or_pass(block: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``block`` if every entry of the whole batch succeeded, else the error naming them."""
    if bool(np.all(ok)):
        return block
    raise NotPositiveDefiniteError.from_mask(
        ok, "the modified matrix", "no result is returned and the inputs are unchanged"
    )
