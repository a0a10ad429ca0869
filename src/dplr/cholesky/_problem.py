"""Validated operands of the Cholesky modifications, and the shape rules for ``u`` and weights.

Shape rule (the one of ``numpy.linalg.solve`` in NumPy 2): ``u`` is a vector
only when it is 1-D, (N,); otherwise it is a stack of (N, M) matrices,
(..., N, M).  A batch of rank-1 updates is spelled ``u[..., None]``.  Weights
(``multiplier``) are a scalar or one per column, (..., M); a batch of one
weight per factor is spelled ``multiplier[..., None]``.  A weight shape that
fits both readings raises and names both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._runtime.backend import Array, backend_of
from .._validate import (
    all_finite,
    broadcast_batch,
    cholesky_weights,
    not_finite_error,
    prepare,
    require_ndim,
    shape_error,
)
from . import _rank1


@dataclass
class Problem:
    """Validated operands: the factor seen as lower triangular, U, the weights."""

    lower: Array  # (..., N, N) lower view of the factor (a transpose view for upper)
    u: Array  # (..., N, M) the update columns U
    weights: Array  # (..., M) signed weights (the public multiplier times the sign)
    batch: tuple[int, ...]
    prep: Any
    source: Any  # the caller's factor object
    is_lower: bool

    @property
    def n(self) -> int:
        return int(self.lower.shape[-1])

    @property
    def m(self) -> int:
        return int(self.u.shape[-1])

    @property
    def ops(self):
        return backend_of(self.lower)


def square_factor(f: Array, allow_empty: bool) -> int:
    """N of a (..., N, N) factor; raises for anything else."""
    require_ndim("factor", f, 2, "(..., N, N)")
    if f.shape[-1] != f.shape[-2] or (f.shape[-1] == 0 and not allow_empty):
        least = "N >= 0" if allow_empty else "N > 0"
        raise ValueError(f"'factor' must be square, (..., N, N) with {least}; got {tuple(f.shape)}")
    return int(f.shape[-1])


def _columns(u: Array, n: int) -> Array:
    """``u`` as (..., N, M): a 1-D u is one vector, anything else a stack of matrices."""
    require_ndim("u", u, 1, f"({n},) or (..., {n}, M)")
    if u.ndim == 1:
        if u.shape[0] != n:
            raise shape_error("u", f"({n},) or (..., {n}, M)", tuple(u.shape))
        return u[:, None]
    if u.shape[-2] != n:
        hint = ""
        if u.shape[-1] == n:
            hint = f"; a batch of vectors of length {n} is spelled u[..., None]"
        why = f" (a vector only when 1-D){hint}"
        raise shape_error("u", f"({n},) or (..., {n}, M)", tuple(u.shape), why)
    return u


def column_weights(raw: Array, m: int, batch: tuple[int, ...]) -> Array:
    """The weights as (..., M): a scalar or one per column; raise on a two-way shape.

    ``batch``: the broadcast batch shape of the factor and ``u``.
    """
    if raw.ndim == 0:
        raw = raw[None]
    shape, last = tuple(raw.shape), int(raw.shape[-1])
    if last not in (1, m):
        raise ValueError(
            f"'multiplier' must be a scalar or have shape (..., M), one weight per column "
            f"of 'u' (M = {m}); got shape {shape}.  For one weight per batch entry pass "
            "multiplier[..., None]"
        )
    if last == m and m > 1 and len(batch) >= raw.ndim and batch[len(batch) - raw.ndim :] == shape:
        raise ValueError(
            f"'multiplier' of shape {shape} can be read two ways: one weight per column of "
            f"'u' (M = {m}), or one weight per batch entry (batch shape {batch}).  Pass "
            f"multiplier[..., None] for the second, or the full shape {(*batch, m)} for the first"
        )
    return backend_of(raw).broadcast_to(raw, (*shape[:-1], m))


def problem(factor, u, multiplier, sign, lower, check_finite) -> Problem:
    """Validate and coerce the operands of :func:`dplr.cholesky_update` and its kin."""
    prep = prepare({"factor": factor, "u": u}, check_finite=False)
    f, u_ = prep["factor"], prep["u"]
    n = square_factor(f, allow_empty=True)
    u_ = _columns(u_, n)
    raw = cholesky_weights(multiplier, prep, u_.shape[-1], False)[..., 0]
    others = broadcast_batch({"factor": tuple(f.shape[:-2]), "u": tuple(u_.shape[:-2])})
    weights = sign * column_weights(raw, int(u_.shape[-1]), others)
    batch = broadcast_batch({"factor": others, "multiplier": tuple(weights.shape[:-1])})
    if check_finite and not all_finite(u_):
        raise not_finite_error("u")
    low = f if lower else f.mT
    return Problem(low, u_, weights, batch, prep, factor, lower)  # diagonal: checked by the path


def check_triangle_finite(pb: Problem) -> None:
    """Raise if the factor's triangle (only it: the other may hold anything) is not finite."""
    low = pb.lower
    if pb.prep.torch:
        import torch

        ok = bool(torch.isfinite(torch.tril(low)).all())
    else:
        n = pb.n
        view = low.reshape(-1, n, n)
        rows = low.strides[-1] <= low.strides[-2]
        ok = bool(_rank1.tri_all_finite(view if rows else view.mT, rows).all())
    if not ok:
        raise not_finite_error("factor")


__all__ = ["Problem", "check_triangle_finite", "column_weights", "problem", "square_factor"]
