"""The one boundary helper: coercion, dtype promotion, finiteness, shapes, choices.

Every public function of dplr passes its array arguments through
:func:`prepare` once and checks the rest of its arguments with the functions
below; kernels behind them assume clean, same-typed, same-dtype, finite
floating arrays and never validate again.  Each kind of argument error has one
wording, written once here:

======================  =========  =====================================================
kind                    exception  helper
======================  =========  =====================================================
missing array           TypeError  :func:`require_present`
dtype kind              TypeError  :func:`dtype_kind_error`
NaN / Inf               ValueError :func:`not_finite_error`, :func:`require_finite`
shape                   ValueError :func:`shape_error`, :func:`require_ndim`
batch broadcasting      ValueError :func:`broadcast_batch`
sign of a log decay     ValueError :func:`require_log_decay`
choice among strings    ValueError :func:`check_choice`
integer in a range      ValueError :func:`positive_int`, :func:`int_in_range`
real scalar             ValueError :func:`finite_scalar`
======================  =========  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._runtime.backend import Array, is_torch
from ._runtime.blas import single_threaded_blas


@dataclass(frozen=True)
class Prepared:
    """Arrays converted to one array library, device and compute dtype."""

    arrays: dict[str, Array | None]
    torch: bool
    compute_dtype: Any  # numpy dtype or torch.dtype
    out_dtype: Any  # dtype of the result handed back to the caller

    def __getitem__(self, name: str) -> Array | None:
        return self.arrays[name]


_NUMPY_LOW_PRECISION = (np.dtype(np.float16),)


# ------------------------------------------------------------- the wordings
def dtype_kind_error(name: str, dtype: object) -> TypeError:
    """A dtype dplr cannot compute with (complex, strings, objects)."""
    return TypeError(
        f"{name!r} must be a real floating or integer array; got dtype {dtype}. "
        "dplr computes in float32 or float64."
    )


def not_finite_error(name: str, *, neg_inf_allowed: bool = False, skippable: bool = True):
    """The one wording of a NaN/Inf error.

    ``neg_inf_allowed``: the argument is a log decay, where -Inf (a factor of
    exactly 0) is valid.  ``skippable``: the function has ``check_finite``.
    """
    what = "NaN or +Inf" if neg_inf_allowed else "NaN or Inf"
    hint = " (pass check_finite=False to skip this check)" if skippable else ""
    return ValueError(f"{name!r} contains {what}{hint}")


def shape_error(name: str, want: str, shape: tuple[int, ...], why: str = "") -> ValueError:
    """The one wording of a shape error: the argument, the shape wanted, the shape given."""
    return ValueError(f"{name!r} must have shape {want}{why}; got shape {tuple(shape)}")


def require_present(named: dict[str, Any]) -> None:
    """``TypeError`` naming the first required array argument that is None."""
    for name, value in named.items():
        if value is None:
            raise TypeError(f"{name!r} is required (an array_like); got None")


def require_ndim(name: str, x: Array, ndim: int, what: str) -> None:
    """Raise ``ValueError`` unless ``x`` has at least ``ndim`` dimensions."""
    if x.ndim < ndim:
        raise shape_error(name, what, tuple(x.shape))


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of the ``allowed`` strings."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name!r} must be one of {allowed}; got {value!r}")


def positive_int(name: str, value: object, allow_none: bool = True) -> int | None:
    """Validate an optional positive integer argument such as ``chunk_size``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name!r} must be a positive integer; got {value!r}")
    return int(value)


def int_in_range(name: str, value: object, lo: int, hi: int) -> int:
    """An integer argument in ``[lo, hi]`` (an index or a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name!r} must be an integer; got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name!r} must be in [{lo}, {hi}]; got {value}")
    return int(value)


def finite_scalar(name: str, value: object) -> float:
    """A real, finite scalar argument (such as ``scale``) as a Python float."""
    try:
        as_float = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name!r} must be a real number; got {value!r}") from None
    if isinstance(value, complex) or not np.isfinite(as_float):
        raise ValueError(f"{name!r} must be a finite real number; got {value!r}")
    return as_float


def first_index(mask: Array) -> tuple[int, ...]:
    """Index of the first True entry of a NumPy or torch boolean array."""
    if is_torch(mask):
        return tuple(int(i) for i in mask.nonzero()[0])
    return tuple(int(i) for i in np.argwhere(mask)[0])


def require_log_decay(name: str, x: Array, *, skip_first: bool = False, axis: int = -1) -> None:
    """``ValueError`` naming the first positive entry of a log decay (NaN passes).

    A log decay is ``<= 0``: its factor ``exp(x)`` lies in [0, 1], with -Inf
    an exact 0 (a full reset).  ``skip_first``: entry 0 along ``axis`` (the
    rows: -1, or -2 for a decay per channel) is not checked (it does not
    enter the matrix).
    """
    positive = x > 0
    if skip_first:
        positive[(..., slice(None, 1)) + (slice(None),) * (-1 - axis)] = False
    if bool(positive.any()):
        where = first_index(positive)
        raise ValueError(
            f"{name!r} must be <= 0 (a log decay: the factor exp({name}) lies in [0, 1]); "
            f"{name}{list(where)} = {float(x[where])}"
        )


def broadcast_batch(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Broadcast the batch (leading) shapes of several arguments, NumPy style."""
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        listed = ", ".join(f"{k}: {s}" for k, s in shapes.items())
        raise ValueError(f"batch dimensions do not broadcast: {listed}") from None


# ------------------------------------------------------------- finiteness
def all_finite(x: Array) -> bool:
    """True if no entry of a NumPy array or torch tensor is NaN or Inf.

    One reduction decides almost always: a sum (for a large contiguous float
    array, the BLAS dot product ``x . x``, 3x faster than ``sum`` here) is
    finite unless an entry is NaN or Inf or the reduction overflows, and only
    then is the elementwise test (several passes over the array) run to tell
    which.  The dot product runs in one BLAS thread: OpenBLAS's helper threads
    keep spinning after a threaded call and took the cores from the solve
    that followed (12 ms -> 20 ms at n = 16384).
    """
    if is_torch(x):
        return bool(x.sum().isfinite()) or bool(x.isfinite().all())
    with np.errstate(over="ignore", invalid="ignore"):
        if x.dtype in (np.float32, np.float64) and x.flags.c_contiguous and x.size >= 2**16:
            flat = x.reshape(-1)
            with single_threaded_blas():
                reduced = np.dot(flat, flat)
        else:
            reduced = x.sum()
        return bool(np.isfinite(reduced)) or bool(np.isfinite(x).all())


def no_nan_or_pos_inf(x: Array) -> bool:
    """True if no entry is NaN or +Inf (-Inf allowed: a log decay's exact zero)."""
    if all_finite(x):
        return True
    if is_torch(x):
        return not bool((x.isnan() | (x == float("inf"))).any())
    return not bool((np.isnan(x) | (x == np.inf)).any())


def require_finite(
    name: str, x: Array | None, *, neg_inf_allowed: bool = False, skippable: bool = True
) -> None:
    """Raise :func:`not_finite_error` if ``x`` holds NaN or Inf (or only NaN/+Inf)."""
    if x is None:
        return
    ok = no_nan_or_pos_inf(x) if neg_inf_allowed else all_finite(x)
    if not ok:
        raise not_finite_error(name, neg_inf_allowed=neg_inf_allowed, skippable=skippable)


# ------------------------------------------------------------- coercion
def prepare(
    named: dict[str, Any],
    *,
    check_finite: bool = True,
    like: Prepared | None = None,
    log_decays: tuple[str, ...] = (),
    skippable: bool = True,
) -> Prepared:
    """Coerce named arguments to one array library and a common float dtype.

    Parameters
    ----------
    named : dict
        ``{argument name: array_like or None}``.  ``None`` entries pass
        through.  Torch tensors stay torch tensors (on their device); anything
        else becomes a NumPy array.
    check_finite : bool
        Raise ``ValueError`` naming the first argument that holds NaN or Inf.
    like : Prepared, optional
        Arrays prepared earlier that the new ones must match in library,
        device and dtype promotion (e.g. the operands of a stored matrix).
    log_decays : tuple of str
        Names of log-decay arguments, where -Inf (a decay factor of 0) is a
        valid value: only NaN and +Inf are refused there.
    skippable : bool
        The caller offers ``check_finite`` (the error message says so).

    Raises
    ------
    TypeError
        Mixed NumPy and torch inputs, or a complex/non-numeric dtype.
    ValueError
        Tensors on different devices, or non-finite values.
    """
    present = {k: v for k, v in named.items() if v is not None}
    torch_flags = {k: is_torch(v) for k, v in present.items()}
    use_torch = like.torch if like is not None else any(torch_flags.values())
    mixed = [k for k, flag in torch_flags.items() if flag != use_torch]
    if mixed:
        have = "torch tensors" if use_torch else "NumPy arrays"
        raise TypeError(
            f"cannot mix NumPy arrays and torch tensors: {mixed} do not match the other "
            f"operands ({have}); convert explicitly, dplr never moves data behind your back"
        )
    prepared = (_prepare_torch if use_torch else _prepare_numpy)(named, present, like)
    if check_finite:
        for name, x in prepared.arrays.items():
            require_finite(name, x, neg_inf_allowed=name in log_decays, skippable=skippable)
    return prepared


def _numpy_dtype(name: str, x: np.ndarray) -> np.dtype:
    if x.dtype.kind in "biu":
        return np.dtype(np.float64)
    if x.dtype.kind != "f" or x.dtype.itemsize > 8:
        raise dtype_kind_error(name, x.dtype)
    return x.dtype


def _torch_dtype(name: str, x: Array) -> Any:
    import torch

    if x.dtype == torch.bool or not (x.dtype.is_floating_point or x.dtype.is_complex):
        return torch.float64
    if x.dtype.is_complex:
        raise dtype_kind_error(name, x.dtype)
    return x.dtype


def _prepare_numpy(named, present, like) -> Prepared:
    arrays = {k: np.asarray(v) for k, v in present.items()}
    dtypes = [_numpy_dtype(k, v) for k, v in arrays.items()]
    if like is not None:
        dtypes.append(np.dtype(like.out_dtype))
    out = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
    compute = np.dtype(np.float32) if out in _NUMPY_LOW_PRECISION else out
    result = {k: arrays[k].astype(compute, copy=False) if k in arrays else None for k in named}
    return Prepared(result, False, compute, out)


def _prepare_torch(named, present, like) -> Prepared:
    import torch

    devices = {v.device for v in present.values()}
    if like is not None:
        ref = next(a for a in like.arrays.values() if a is not None)
        devices.add(ref.device)
    if len(devices) > 1:
        where = {k: str(v.device) for k, v in present.items()}
        raise ValueError(f"all tensors must be on one device; got {where}")
    dtypes = [_torch_dtype(k, v) for k, v in present.items()]
    if like is not None:
        dtypes.append(like.out_dtype)
    out = dtypes[0] if dtypes else torch.float64
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    compute = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    result = {k: present[k].to(compute) if k in present else None for k in named}
    return Prepared(result, True, compute, out)


def to_output(y: Array, prepared: Prepared) -> Array:
    """Cast a computed result to the dtype the caller's inputs promote to."""
    if prepared.torch:
        return y.to(prepared.out_dtype)
    return y.astype(prepared.out_dtype, copy=False)


# ------------------------------------------------------------- the delta rule
def check_delta_shapes(
    p: Prepared, gated: bool, per_channel: bool = False
) -> tuple[int, int, int, int, int, int]:
    """(B, T, H, HV, K, V) of the delta rules' prepared operands; ``g <= 0`` when gated.

    Value heads HV are a positive multiple of the key heads H (or both 0);
    v, beta, g and the state carry HV heads.  ``per_channel``: g has one log
    decay per key channel, (B, T, HV, K) (KDA), else (B, T, HV).
    """
    q, k, v = p["q"], p["k"], p["v"]
    if q.ndim != 4:
        raise shape_error("q", "(B, T, H, K)", q.shape)
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise shape_error("k", f"(B, T, H, K) = {(B, T, H, K)} like q", k.shape)
    if v.ndim != 4 or tuple(v.shape[:2]) != (B, T) or not _is_group_count(H, v.shape[2]):
        why = f" with (B, T) = {(B, T)} like q and HV a multiple of H = {H}"
        raise shape_error("v", "(B, T, HV, V)", v.shape, why)
    HV = int(v.shape[2])
    if tuple(p["beta"].shape) != (B, T, HV):
        raise shape_error("beta", f"(B, T, HV) = {(B, T, HV)} like v", p["beta"].shape)
    if gated:
        want, what = ((B, T, HV, K), "(B, T, HV, K)") if per_channel else ((B, T, HV), "(B, T, HV)")
        if tuple(p["g"].shape) != want:
            raise shape_error("g", f"{what} = {want} like v and q", p["g"].shape)
        require_log_decay("g", p["g"])
    return B, T, H, HV, K, int(v.shape[-1])


def _is_group_count(heads: int, value_heads: int) -> bool:
    """True if ``value_heads`` is a positive multiple of ``heads`` (or both are 0)."""
    if heads == 0:
        return value_heads == 0
    return value_heads >= heads and value_heads % heads == 0


def check_cu_seqlens(cu_seqlens: Any, B: int, T: int) -> np.ndarray | None:
    """Sequence boundaries ``[0, ..., T]``, non-decreasing, as int64 (None passes)."""
    if cu_seqlens is None:
        return None
    if is_torch(cu_seqlens):
        cu_seqlens = cu_seqlens.detach().cpu().numpy()
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or cu.dtype.kind not in "iu":
        raise ValueError(
            f"'cu_seqlens' must be a 1-D integer array of N + 1 >= 2 boundaries; "
            f"got dtype {cu.dtype} and shape {cu.shape}"
        )
    if B != 1:
        raise ValueError(f"'cu_seqlens' packs sequences along T and needs B == 1; got B = {B}")
    if cu[0] != 0 or cu[-1] != T or bool((np.diff(cu) < 0).any()):
        raise ValueError(
            f"'cu_seqlens' must start at 0, never decrease and end at T = {T}; got {cu.tolist()}"
        )
    return cu.astype(np.int64)


# ------------------------------------------------- Cholesky factors and weights
def cholesky_weights(multiplier: Any, prep: Any, m: int, rank_m: bool) -> Array:
    """The multiplier as a (..., M) array of the compute dtype."""
    if prep.torch:
        import torch

        ref = prep["factor"]
        if isinstance(multiplier, np.ndarray):
            raise TypeError("'multiplier' is a NumPy array but the factor is a torch tensor")
        w = torch.as_tensor(multiplier, device=ref.device)
        if w.dtype.is_complex or w.dtype == torch.bool:
            raise dtype_kind_error("multiplier", w.dtype)
        w = w.to(prep.compute_dtype)
    else:
        if is_torch(multiplier):
            raise TypeError("'multiplier' is a torch tensor but the factor is a NumPy array")
        w = np.asarray(multiplier)
        if w.dtype.kind not in "iuf":
            raise dtype_kind_error("multiplier", w.dtype)
        w = w.astype(prep.compute_dtype)
    require_finite("multiplier", w, skippable=False)
    if rank_m and w.ndim >= 1 and w.shape[-1] == m:
        return w
    return w[..., None]


def check_cholesky_diagonal(low: Array, check_finite: bool) -> None:
    """A Cholesky factor has a positive diagonal; report the first entry that is not."""
    diag = low.diagonal(0, -2, -1)
    good = diag > 0
    if bool(good.all()):
        return
    where = first_index(~good)
    value = float(diag[where])
    if check_finite and not np.isfinite(value):
        raise not_finite_error("factor")
    raise ValueError(
        f"'factor' must have a positive diagonal (a Cholesky factor); "
        f"diagonal entry {list(where)} is {value}"
    )
