"""``LowRankTril``: lower-triangular diagonal-plus-low-rank matrices.

    T = diag(diag) + tril(Q K^T ⊙ D, -1),   D[i, j] = exp(sum_{s=j+1..i} log_decay[s])

or, with one decay per channel (``log_decay`` of shape (..., n, d)),
``T[i, j] = sum_c q[i, c] k[j, c] exp(sum_{s=j+1..i} log_decay[s, c])``.

The class is a small immutable description of T; the arithmetic lives in the
pure functions of :mod:`dplr.core._kernels` (forward) and :mod:`dplr.core._grad`
(backward).  Derivations: ``docs/algorithms.md``, section 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import SingularMatrixError
from .._runtime.backend import Array, backend_of, is_torch
from .._runtime.blas import single_threaded_blas
from .._validate import (
    Prepared,
    broadcast_batch,
    first_index,
    no_nan_or_pos_inf,
    positive_int,
    prepare,
    require_log_decay,
    require_ndim,
    require_present,
    shape_error,
    to_output,
)
from . import _kernels, _rowwise
from ._grad import torch_functions
from ._rowwise import NonFiniteInput

__all__ = ["LowRankTril", "tril_inv", "tril_matmul", "tril_solve"]


def _reads_per_channel(log_decay: Array | None, q: Array) -> bool:
    """Whether ``log_decay`` is per channel, (..., n, d), rather than (..., n).

    A (..., n, d) array is per channel; when d == n the same shape could be a
    batch of (n,) decays, and it is read per channel when it has at least as
    many dimensions as q.
    """
    if log_decay is None or log_decay.ndim < 2:
        return False
    n, d = q.shape[-2:]
    if tuple(log_decay.shape[-2:]) != (n, d):
        return False
    return d != n or log_decay.ndim >= q.ndim


def _without_first_decay(log_decay: Array, torch: bool, per_channel: bool = False) -> Array:
    """Check a log decay and set its row 0, which does not enter T, to 0.

    ``D[i, j]`` sums ``log_decay[j+1 .. i]``, never ``log_decay[0]``: any value
    is accepted there (NaN and +Inf only with ``check_finite=False``), and it
    is replaced by 0 so that no kernel can turn it into Inf or NaN.  Rows
    1.. must be ``<= 0``; -Inf is a decay factor of exactly 0.  The rows are
    the last axis, or the one before it for a per-channel decay.
    """
    axis = -2 if per_channel else -1
    require_log_decay("log_decay", log_decay, skip_first=True, axis=axis)
    first = (..., slice(None, 1), slice(None)) if per_channel else (..., slice(None, 1))
    if torch:
        out = log_decay.clone()
    else:
        out = log_decay.copy()
    out[first] = 0.0
    return out


def _ones_if_none(lam: Array | None, q: Array) -> Array:
    """The diagonal of T, (..., n) like q's rows: ones for None (a unit diagonal)."""
    return backend_of(q).zeros(q.shape[:-1], q) + 1.0 if lam is None else lam


class LowRankTril:
    """Lower-triangular ``T = diag(diag) + tril(q k^T ⊙ D, -1)`` with optional decay.

    The decay is one per row, or one per row and channel (as in gated linear
    attention with per-channel gates).

    Nothing of size n x n is stored or formed, except by :meth:`inv` and
    :meth:`to_dense`.  Leading dimensions are batch dimensions and broadcast
    like :func:`numpy.matmul`.

    Parameters
    ----------
    q, k : (..., n, d) array_like
        Low-rank factors: ``T[i, j] = q[i] . k[j] * D[i, j]`` for ``i > j``.
    diag : (..., n) array_like, optional
        Diagonal of T.  Default: ones (a unit triangular matrix).
    log_decay : (..., n) or (..., n, d) array_like, optional
        Log decay per row, ``<= 0``: ``D[i, j] = exp(log_decay[j+1] + ... +
        log_decay[i])``; ``-inf`` is a decay factor of exactly 0 (rows after
        it do not see rows before it).  ``log_decay[0]`` does not enter T, so
        any value is accepted there (it is stored as 0).  Default: no decay
        (``D = 1``).  Of shape (..., n, d) it is a decay per channel:
        ``T[i, j] = sum_c q[i, c] k[j, c] exp(log_decay[j+1, c] + ... +
        log_decay[i, c])`` for ``i > j`` (-inf then resets one channel).
        When d == n, a (..., n, n) array is read per channel if it has at
        least as many dimensions as q.
    check_finite : bool, default True
        Raise if an input holds NaN or Inf (like :func:`scipy.linalg.solve`).

    Raises
    ------
    ValueError
        Shapes that do not match or broadcast, positive ``log_decay[1:]``,
        NaN or Inf (in ``log_decay``: NaN or +Inf).
    TypeError
        A missing q or k, complex or non-numeric input, or NumPy and torch
        inputs mixed.

    Notes
    -----
    n = 0 is allowed: products, solves and inverses are empty and
    ``slogdet`` is ``(1, 0)``, as in NumPy and SciPy.
    Inputs may be NumPy arrays (or anything :func:`numpy.asarray` takes) or
    torch tensors on any device; results have the type, device and promoted
    dtype of the inputs (integers promote to float64; float16 and bfloat16
    are computed in float32 and returned in their own dtype).  With torch,
    :meth:`matmul`, :meth:`solve` and :meth:`inv` are differentiable with
    respect to q, k, diag, log_decay and the right-hand side, with a
    hand-written O(n) backward.

    Per-channel decay costs what one decay per row costs, up to the
    exponentials: the decay factors are formed relative to anchor rows a few
    rows apart (``docs/algorithms.md``, section 10), so that float32 stays
    exact to its precision for decays down to -5 per row and no result or
    gradient is NaN for any decay ``<= 0``, ``-inf`` included.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 500, 8)) / 8
    >>> T = dplr.LowRankTril(q, k, diag=np.full(500, 2.0))
    >>> v = rng.standard_normal((500, 3))
    >>> x = T.solve(v)
    >>> np.allclose(T @ x, v), np.allclose(T.to_dense() @ x, v)
    (True, True)
    """

    __slots__ = ("_batch", "_checked", "_diag", "_k", "_log_decay", "_per_channel", "_prep", "_q")

    def __init__(
        self,
        q: Any,
        k: Any,
        diag: Any = None,
        log_decay: Any = None,
        *,
        check_finite: bool = True,
    ) -> None:
        require_present({"q": q, "k": k})
        prep = prepare(
            {"q": q, "k": k, "diag": diag, "log_decay": log_decay},
            check_finite=check_finite,
            log_decays=("log_decay",),
        )
        q, k, diag, log_decay = prep["q"], prep["k"], prep["diag"], prep["log_decay"]
        require_ndim("q", q, 2, "(..., n, d)")
        require_ndim("k", k, 2, "(..., n, d)")
        n, d = q.shape[-2:]
        if k.shape[-2:] != q.shape[-2:]:
            raise shape_error("k", f"(..., {n}, {d})", tuple(k.shape), ", the same n and d as 'q'")
        shapes = {"q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2])}
        self._per_channel = _reads_per_channel(log_decay, q)
        if self._per_channel:
            shapes["log_decay"] = tuple(log_decay.shape[:-2])
        for name, arr in (("diag", diag), ("log_decay", log_decay)):
            if arr is None or (name == "log_decay" and self._per_channel):
                continue
            require_ndim(name, arr, 1, "(..., n)")
            if arr.shape[-1] != n:
                want = f"(..., {n}) or (..., {n}, {d})" if name == "log_decay" else f"(..., {n})"
                raise shape_error(name, want, tuple(arr.shape), f" to match 'q' {(n, d)}")
            shapes[name] = tuple(arr.shape[:-1])
        if log_decay is not None:
            log_decay = _without_first_decay(log_decay, prep.torch, self._per_channel)
        self._q, self._k, self._diag, self._log_decay = q, k, diag, log_decay
        self._batch = broadcast_batch(shapes)
        self._prep = prep
        self._checked = check_finite

    # ------------------------------------------------------------------ info
    @property
    def shape(self) -> tuple[int, ...]:
        """``(..., n, n)``: the broadcast batch shape and the matrix size."""
        n = self._q.shape[-2]
        return (*self._batch, n, n)

    @property
    def rank(self) -> int:
        """d, the number of columns of q and k."""
        return int(self._q.shape[-1])

    @property
    def dtype(self) -> Any:
        """The dtype of results (the promoted dtype of the inputs)."""
        return self._prep.out_dtype

    @property
    def q(self) -> Array:
        return self._q

    @property
    def k(self) -> Array:
        return self._k

    @property
    def diag(self) -> Array:
        """The diagonal, (..., n); ones when none was given."""
        return self._lam(self._prep)

    @property
    def log_decay(self) -> Array | None:
        """The log decay T uses, (..., n); entry 0 (which does not enter T) reads 0."""
        return self._log_decay

    def __repr__(self) -> str:
        lib = "torch" if self._prep.torch else "numpy"
        decay = ", decay" if self._log_decay is not None else ""
        decay = ", per-channel decay" if self._per_channel else decay
        return (
            f"LowRankTril(shape={self.shape}, rank={self.rank}, dtype={self.dtype}, {lib}{decay})"
        )

    # --------------------------------------------------------------- helpers
    def _lam(self, prep: Prepared) -> Array:
        ops = backend_of(self._q)
        if self._diag is not None:
            return self._diag
        return ops.zeros(self._q.shape[:-1], self._q) + 1.0

    def _operands(self, v: Any, check_finite: bool) -> tuple[Prepared, tuple, bool, Prepared]:
        """Validate a right-hand side and broadcast everything to one batch shape.

        The diagonal is None when T has a unit diagonal (:func:`_ones_if_none`).
        """
        require_present({"v": v})
        pv = prepare({"v": v}, check_finite=check_finite, like=self._prep)
        v = pv["v"]
        n = self._q.shape[-2]
        want, why = f"(..., {n}, m) or ({n},)", f" to match T ({n} x {n})"
        require_ndim("v", v, 1, want)
        if v.shape[-1 if v.ndim == 1 else -2] != n:
            raise shape_error("v", want, tuple(v.shape), why)
        vector = v.ndim == 1
        if vector:
            v = v[:, None]
        batch = broadcast_batch({"T": self._batch, "v": tuple(v.shape[:-2])})
        ops = backend_of(v)
        dtype = pv.compute_dtype

        def full(x: Array | None, tail: tuple[int, ...]) -> Array | None:
            if x is None:
                return None
            return ops.broadcast_to(
                x.to(dtype) if pv.torch else x.astype(dtype, copy=False), (*batch, *tail)
            )

        d = self._q.shape[-1]
        m = v.shape[-1]
        q = full(self._q, (n, d))
        k = full(self._k, (n, d))
        lam = full(self._diag, (n,))
        log_decay = full(self._log_decay, (n, d) if self._per_channel else (n,))
        v = full(v, (n, m))
        return (q, k, lam, log_decay, v), batch, vector, pv

    def _check_nonsingular(self) -> None:
        if self._diag is None:
            return
        zero = self._diag == 0
        if bool(zero.any()):
            where = list(first_index(zero))
            raise SingularMatrixError(
                f"T is singular: diag{where} == 0 (a triangular matrix is invertible "
                "iff its diagonal has no zero)"
            )

    def _apply(
        self, op: str, v: Any, transpose: bool, chunk_size: int | None, check_finite: bool,
        check_in_loop: bool = False,
    ) -> Array:  # fmt: skip
        """Run the ``"matmul"`` or ``"solve"`` kernel (torch: through its autograd Function).

        ``check_in_loop``: the row-by-row loop checks every operand for NaN
        and Inf as it reads them, and :class:`~dplr.core._rowwise.NonFiniteInput`
        is raised if one holds any, or if that loop does not run.  A checked
        NumPy solve with T checks v in its pass over v instead (a separate
        pass took 1.1 of 12.4 ms at n = 16384, d = m = 64); if that found a
        NaN or an Inf, the usual check raises the error.
        """
        chunk_size = positive_int("chunk_size", chunk_size)
        given = v
        in_pass = (
            check_finite and op == "solve" and not transpose and not check_in_loop
            and not self._prep.torch and not is_torch(v)
        )  # fmt: skip
        (q, k, lam, ld, v), _, vector, pv = self._operands(v, check_finite and not in_pass)
        if check_in_loop and (pv.torch or v.shape[-2] == 0):
            raise NonFiniteInput  # no loop runs: nothing was checked
        if v.shape[-2] == 0:  # n = 0: an empty result, as NumPy's and SciPy's solves give
            y = v * 0.0
        elif pv.torch:
            tril_solve_fn, tril_matmul_fn = torch_functions()
            fn = tril_solve_fn if op == "solve" else tril_matmul_fn
            y = fn.apply(q, k, _ones_if_none(lam, q), ld, v, None, transpose, chunk_size)
            y = y[0] if op == "solve" else y
        else:  # NumPy
            kernel = _kernels.solve if op == "solve" else _kernels.matmul

            def run(**checks: bool) -> Array | None:
                with single_threaded_blas():
                    try:
                        return kernel(backend_of(v), q, k, lam, ld, v, transpose=transpose,
                                      chunk_size=chunk_size, **checks)[0]  # fmt: skip
                    except NonFiniteInput:
                        if not in_pass:
                            raise
                        return None

            y = run(check_finite=check_in_loop, **({"check_v": True} if in_pass else {}))
            if y is None:  # v held a NaN or an Inf, or nothing was checked
                self._operands(given, True)  # raises the error of a checked call
                y = run()
        return to_output(y[..., 0] if vector else y, pv)

    # ------------------------------------------------------------ operations
    def matmul(
        self, v: Any, *, transpose: bool = False, chunk_size: int | None = None,
        check_finite: bool = True,
    ) -> Array:  # fmt: skip
        """``T @ v`` (or ``T^T @ v`` with ``transpose=True``).

        Parameters
        ----------
        v : (..., n, m) or (n,) array_like
            Right-hand side; its batch dimensions broadcast with T's.
        transpose : bool, default False
            Multiply by ``T^T`` instead.
        chunk_size : int, optional
            Rows per chunk (default 32).  Only speed depends on it.
        check_finite : bool, default True
            Raise if ``v`` holds NaN or Inf.

        Returns
        -------
        y : (..., n, m) or (n,) array
            Same library, device and promoted dtype as the inputs.

        Notes
        -----
        O(n c (d + m) + n d m) flops for chunk size c; no n x n intermediate.
        """
        return self._apply("matmul", v, transpose, chunk_size, check_finite)

    def __matmul__(self, v: Any) -> Array:
        return self.matmul(v)

    def solve(
        self, v: Any, transpose: bool = False, chunk_size: int | None = None, *,
        check_finite: bool = True,
    ) -> Array:  # fmt: skip
        """Solve ``T x = v`` (or ``T^T x = v`` with ``transpose=True``).

        Parameters
        ----------
        v : (..., n, m) or (n,) array_like
            Right-hand side; its batch dimensions broadcast with T's.
        transpose : bool, default False
            Solve with ``T^T`` (an upper-triangular system) instead.
        chunk_size : int, optional
            Rows per chunk c (default 32).  Only speed depends on it.
        check_finite : bool, default True
            Raise if ``v`` holds NaN or Inf.

        Returns
        -------
        x : (..., n, m) or (n,) array

        Raises
        ------
        SingularMatrixError
            If ``diag`` has an exact zero.
        ValueError
            If ``v`` has the wrong number of rows or does not broadcast.

        Notes
        -----
        Chunked forward substitution: the c x c diagonal blocks of T for all
        chunks at once, then a pass over the chunks that carries a d x m
        state: ``X_J = T_JJ^-1 (V_J - Q_J Z)`` (a triangular solve with the
        block), ``Z <- a_J Z + K_J^T X_J``.  O(n c (d + m) + n d m) flops,
        O(n (d + m + c)) memory.

        Examples
        --------
        >>> import numpy as np, dplr
        >>> rng = np.random.default_rng(1)
        >>> k = rng.standard_normal((300, 4)); k /= np.linalg.norm(k, axis=1, keepdims=True)
        >>> T = dplr.LowRankTril(0.5 * k, k, log_decay=np.full(300, -0.05))
        >>> b = rng.standard_normal(300)
        >>> x = T.solve(b, transpose=True)
        >>> np.allclose(T.to_dense().T @ x, b)
        True
        """
        self._check_nonsingular()
        return self._apply("solve", v, transpose, chunk_size, check_finite)

    def inv(self, chunk_size: int | None = None, *, check_finite: bool = True) -> Array:
        """The dense inverse ``T^-1``, (..., n, n).

        Block row J of the inverse is ``[-W_J Z, T_JJ^-1, 0]`` with
        ``W_J = T_JJ^-1 Q_J`` and a d x n state Z: O(n^2 d) flops, only the lower
        block triangle is computed.  Prefer :meth:`solve` when you need
        ``T^-1 v``: it is O(n).

        Parameters
        ----------
        chunk_size : int, optional
            Rows per chunk (default 32).  Only speed depends on it.
        check_finite : bool, default True
            Raise if an operand of T holds NaN or Inf.  The constructor
            checked them already unless it was given ``check_finite=False``;
            only then does this scan them.

        Raises
        ------
        SingularMatrixError
            If ``diag`` has an exact zero.
        ValueError
            If ``check_finite`` and an operand holds NaN or Inf.
        """
        chunk_size = positive_int("chunk_size", chunk_size)
        if check_finite and not self._checked:
            named = {"q": self._q, "k": self._k, "diag": self._diag, "log_decay": self._log_decay}
            prepare(named, check_finite=True, log_decays=("log_decay",))
            self._checked = True
        self._check_nonsingular()
        n = self._q.shape[-2]
        ops = backend_of(self._q)
        if n == 0:
            return to_output(ops.zeros((*self._batch, 0, 0), self._q), self._prep)
        if self._prep.torch:
            # Differentiable through the solve: T^-1 = solve(I).
            eye = ops.eye(n, self._q)
            return self.solve(eye, chunk_size=chunk_size, check_finite=False)
        # A placeholder right-hand side of the compute dtype (float64 would
        # promote a float32 T and run the float64 kernels).
        placeholder = np.zeros((n, 1), self._prep.compute_dtype)
        (q, k, lam, ld, _), _, _, _ = self._operands(placeholder, False)
        with single_threaded_blas():
            out = _kernels.inverse(ops, q, k, _ones_if_none(lam, q), ld, chunk_size=chunk_size)
        return to_output(out, self._prep)

    def to_dense(self) -> Array:
        """The dense matrix T, (..., n, n), formed from the definition."""
        n = self._q.shape[-2]
        ops = backend_of(self._q)
        (q, k, lam, ld, _), _, _, _ = self._operands(ops.zeros((n, 1), self._q), False)
        return to_output(_kernels.dense(ops, q, k, _ones_if_none(lam, q), ld), self._prep)

    def slogdet(self) -> tuple[Array, Array]:
        """Sign and log of the absolute value of ``det T``, like :func:`numpy.linalg.slogdet`.

        ``det T = prod(diag)``: O(n).  Returns ``(sign, logabsdet)``, each of
        the batch shape; a zero on the diagonal gives ``(0, -inf)``.
        """
        ops = backend_of(self._q)
        lam = ops.broadcast_to(self._lam(self._prep), (*self._batch, self._q.shape[-2]))
        if self._prep.torch:
            import torch

            sign = torch.sign(lam).prod(-1)
            logabs = lam.abs().log().sum(-1)
        else:
            sign = np.sign(lam).prod(-1)
            with np.errstate(divide="ignore"):
                logabs = np.log(np.abs(lam)).sum(-1)
        return to_output(sign, self._prep), to_output(logabs, self._prep)


def tril_matmul(
    q: Any, k: Any, v: Any, diag: Any = None, log_decay: Any = None, *,
    transpose: bool = False, chunk_size: int | None = None, check_finite: bool = True,
) -> Array:  # fmt: skip
    """``T @ v`` for ``T = LowRankTril(q, k, diag, log_decay)``; see :meth:`LowRankTril.matmul`.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> q, k, v = np.ones((3, 1)), np.arange(3.0)[:, None], np.eye(3)
    >>> dplr.tril_matmul(q, k, v)
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 1., 1.]])
    """
    return _one_call("matmul", q, k, v, diag, log_decay, transpose, chunk_size, check_finite)


def tril_solve(
    q: Any, k: Any, v: Any, diag: Any = None, log_decay: Any = None, transpose: bool = False,
    chunk_size: int | None = None, *, check_finite: bool = True,
) -> Array:  # fmt: skip
    """``T^-1 v`` (or ``T^-T v``) for ``T = LowRankTril(q, k, diag, log_decay)``.

    See :meth:`LowRankTril.solve` for shapes, cost and errors.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> q, k = np.ones((3, 1)), np.ones((3, 1))
    >>> dplr.tril_solve(q, k, np.array([1.0, 1.0, 2.0]))
    array([1., 0., 1.])
    """
    return _one_call("solve", q, k, v, diag, log_decay, transpose, chunk_size, check_finite)


def _one_call(
    op: str, q: Any, k: Any, v: Any, diag: Any, log_decay: Any, transpose: bool,
    chunk_size: int | None, check_finite: bool,
) -> Array:  # fmt: skip
    """``T.matmul(v)`` or ``T.solve(v)`` for ``T = LowRankTril(q, k, diag, log_decay)``.

    With ``check_finite``, where the row-by-row loop runs (:mod:`dplr.core._rowwise`)
    it checks the operands for NaN and Inf as it reads them, instead of a
    separate pass over them before it (the check took a fifth of the time
    at n = 10^6, d <= 8, m = 1).  If it read a NaN or an Inf, or anything
    else fails, the call is made again with the separate checks, which
    raise the error a checked call raises (naming the argument); the
    result of the first call is never returned then.
    """
    if check_finite and _loop_reads_all(q, k, v, diag, log_decay):
        try:
            T = LowRankTril(q, k, diag, log_decay, check_finite=False)
            if op == "solve":
                T._check_nonsingular()
            return T._apply(op, v, transpose, chunk_size, False, check_in_loop=True)
        except (ValueError, np.linalg.LinAlgError, NonFiniteInput):
            pass  # the checked call below raises the error (outside this handler: no chaining)
    T = LowRankTril(q, k, diag, log_decay, check_finite=check_finite)
    apply = T.solve if op == "solve" else T.matmul
    return apply(v, transpose=transpose, chunk_size=chunk_size, check_finite=check_finite)


def _loop_reads_all(q: Any, k: Any, v: Any, diag: Any, log_decay: Any) -> bool:
    """Whether the row-by-row loop will run and read every entry that the checks would scan.

    Nonempty NumPy float32/float64 arrays with d small enough for the loop.
    It never reads ``log_decay``'s first row (stored as 0), which is
    checked here (NaN or +Inf there is refused like anywhere else).
    """
    if q is None or k is None or v is None:
        return False
    given = [x for x in (q, k, v, diag, log_decay) if x is not None]
    loop_dtypes = (np.float32, np.float64)
    if not all(type(x) is np.ndarray and x.dtype in loop_dtypes and x.size for x in given):
        return False
    if q.ndim < 2 or v.ndim < 1 or not _rowwise.applies(q, v):
        return False
    if log_decay is None:
        return True
    if log_decay.ndim < 1:
        return False
    per_channel = _reads_per_channel(log_decay, q)
    return no_nan_or_pos_inf(log_decay[..., :1, :] if per_channel else log_decay[..., :1])


def tril_inv(
    q: Any, k: Any, diag: Any = None, log_decay: Any = None, chunk_size: int | None = None,
    *, check_finite: bool = True,
) -> Array:  # fmt: skip
    """Dense ``T^-1`` for ``T = LowRankTril(q, k, diag, log_decay)``.

    See :meth:`LowRankTril.inv` for cost and errors.
    """
    T = LowRankTril(q, k, diag, log_decay, check_finite=check_finite)
    return T.inv(chunk_size, check_finite=check_finite)
