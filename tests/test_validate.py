"""dplr._validate: the argument checks of the core and the delta rule, one wording each.

Every public entry point reports a bad argument with the helper of its kind
(``_validate`` module docstring); these tests check the wording through the
public functions and the helpers themselves.
"""

from __future__ import annotations

import numpy as np
import pytest

import dplr
from dplr import _validate

try:
    import torch
except ImportError:  # torch is optional: the torch tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _ops(n=5, d=2):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)), rng.standard_normal((n, d))


def _delta_args(B=1, T=12, H=2, K=3, V=2):
    rng = np.random.default_rng(8)
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": rng.standard_normal((B, T, H, K)),
        "k": k,
        "v": rng.standard_normal((B, T, H, V)),
        "g": -rng.uniform(0.0, 0.3, (B, T, H)),
        "beta": rng.uniform(0.0, 1.0, (B, T, H)),
    }


def _gated(a, **kw):
    return dplr.gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], **kw)


# ----------------------------------------------------------------- the core
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": np.ones((4, 2))}, r"'k' must have shape \(\.\.\., 5, 2\).*same n and d.*\(4, 2\)"),
        ({"k": np.ones((5, 3))}, "same n and d"),
        ({"q": np.ones(5)}, r"'q' must have shape \(..., n, d\); got shape \(5,\)"),
        ({"diag": np.ones(4)}, r"'diag' must have shape \(..., 5\)"),
        ({"log_decay": np.ones((2, 5))}, r"'log_decay' must be <= 0"),
        ({"log_decay": -np.ones(6)}, r"'log_decay' must have shape \(..., 5\)"),
        ({"q": np.ones((3, 5, 2)), "k": np.ones((2, 5, 2))}, "batch dimensions do not broadcast"),
        ({"q": np.full((5, 2), np.nan)}, "'q' contains NaN or Inf"),
        ({"diag": np.array([1, 1, np.inf, 1, 1])}, "'diag' contains NaN or Inf"),
        ({"log_decay": np.array([0, -1, np.nan, -1, -1])}, "'log_decay' contains NaN or \\+Inf"),
        ({"log_decay": np.array([0, -1, np.inf, -1, -1])}, "'log_decay' contains NaN or \\+Inf"),
    ],
)
def test_bad_construction_raises_value_error(kwargs, match):
    q, k = _ops()
    args = {"q": q, "k": k, **kwargs}
    with pytest.raises(ValueError, match=match):
        dplr.LowRankTril(**args)


def test_log_decay_minus_inf_is_accepted_and_entry_zero_does_not_enter():
    """-inf is a decay factor of 0; log_decay[0] (absent from T) may take any finite value."""
    q, k = _ops()
    T = dplr.LowRankTril(q, k, log_decay=np.array([0.0, -1.0, -np.inf, -0.5, 0.0]))
    assert T.log_decay[2] == -np.inf
    with pytest.raises(ValueError, match=r"'log_decay' must be <= 0.*log_decay\[1\] = 0\.5"):
        dplr.LowRankTril(q, k, log_decay=np.array([0.0, 0.5, -1.0, -1.0, -1.0]))
    given = np.array([7.0, -1.0, -1.0, -1.0, -1.0])
    T = dplr.LowRankTril(q, k, log_decay=given)
    assert T.log_decay[0] == 0.0 and given[0] == 7.0  # the caller's array is untouched
    dplr.LowRankTril(q, k, log_decay=np.array([-np.inf, -1.0, -1.0, -1.0, -1.0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("rows", [6, 2**15])  # a sum, or (>= 2^16 entries) BLAS x . x
def test_finiteness_check_is_exact_at_the_extremes(dtype, layout, rows):
    # The fast check reduces the array (x . x or a sum), which overflows for
    # huge finite entries: those must still pass, and one NaN or Inf must not.
    big = np.finfo(dtype).max
    x = np.full((rows, 4), big / 2, dtype)
    x[1, 2] = -big
    view = x if layout == "contiguous" else x[:, ::2]
    assert _validate.all_finite(view) and _validate.no_nan_or_pos_inf(view)
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[4, 0] = bad
        y = y if layout == "contiguous" else y[:, ::2]
        assert not _validate.all_finite(y)
        assert _validate.no_nan_or_pos_inf(y) == (bad == -np.inf)


def test_check_finite_false_skips_the_scan():
    q, k = _ops()
    q[3, 0] = np.nan
    T = dplr.LowRankTril(q, k, check_finite=False)  # no error: the caller opted out
    x = T.solve(np.ones(5), check_finite=False)
    assert np.isfinite(x[:3]).all() and np.isnan(x[3:]).all()  # NaN propagates, rows 0-2 exact
    with pytest.raises(ValueError, match="'q' contains NaN or Inf"):
        T.inv()  # inv's own check_finite scans what the constructor skipped
    assert np.isnan(T.inv(check_finite=False)[3:]).any()
    with pytest.raises(ValueError, match="'q' contains NaN or Inf"):
        dplr.tril_inv(q, k)


@pytest.mark.parametrize("bad", [np.ones((5, 2), complex), np.array([["a", "b"]] * 5)])
def test_non_real_dtypes_raise_type_error(bad):
    _, k = _ops()
    with pytest.raises(TypeError, match="'q' must be a real floating or integer array"):
        dplr.LowRankTril(bad, k)


def test_right_hand_side_errors():
    T = dplr.LowRankTril(*_ops())
    with pytest.raises(ValueError, match=r"'v' must have shape .*to match T \(5 x 5\).*\(4, 2\)"):
        T.solve(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"'v' must have shape .*\(5,\).*got shape \(4,\)"):
        T.matmul(np.ones(4))
    with pytest.raises(ValueError, match="'v' contains NaN or Inf"):
        T.matmul(np.array([1.0, 2, 3, 4, np.nan]))
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        dplr.LowRankTril(*(np.ones((3, 5, 2)),) * 2).solve(np.ones((2, 5, 1)))
    with pytest.raises(ValueError, match="'chunk_size' must be a positive integer; got 0"):
        T.solve(np.ones(5), chunk_size=0)
    with pytest.raises(ValueError, match="'chunk_size' must be a positive integer"):
        T.inv(chunk_size=-1)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k: dplr.LowRankTril(None, k),
        lambda q, k: dplr.LowRankTril(q, None),
        lambda q, k: dplr.LowRankTril(q, k).solve(None),
        lambda q, k: dplr.tril_matmul(q, k, None),
    ],
)
def test_missing_arrays_raise_type_error_naming_them(call):
    q, k = _ops()
    with pytest.raises(TypeError, match=r"'(q|k|v)' is required \(an array_like\); got None"):
        call(q, k)


@needs_torch
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_torch_non_finite_inputs_are_refused(bad):
    q, k = (torch.tensor(x) for x in _ops())
    q[2, 1] = bad
    with pytest.raises(ValueError, match="'q' contains NaN or Inf"):
        dplr.LowRankTril(q, k)
    with pytest.raises(ValueError, match="'v' contains NaN or Inf"):
        dplr.LowRankTril(k, k).solve(q)
    args = {n: torch.tensor(x) for n, x in _delta_args().items()}
    args["v"][0, 3, 1, 0] = bad
    with pytest.raises(ValueError, match=r"'v' contains NaN or Inf$"):
        _gated(args)


@needs_torch
def test_mixing_numpy_and_torch_is_refused():
    q, k = (torch.tensor(x) for x in _ops(6))
    T = dplr.LowRankTril(q, k)
    with pytest.raises(TypeError, match="cannot mix NumPy arrays and torch tensors"):
        T.solve(np.ones((6, 1)))
    with pytest.raises(TypeError, match="cannot mix"):
        dplr.LowRankTril(q, k.numpy())


# ------------------------------------------------------------ the delta rule
@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("q", lambda x: x[..., :2], "'k'"),
        ("k", lambda x: x[:, :5], "'k'"),
        ("v", lambda x: x[:, :, :1], "'v'"),
        ("beta", lambda x: x[..., None], "'beta'"),
        ("g", lambda x: x[:, :3], "'g'"),
        ("g", lambda x: x + 1.0, "'g'.*<= 0"),
        ("g", lambda x: np.where(x < -0.2, np.inf, x), "'g' contains NaN or \\+Inf$"),
        ("g", lambda x: np.where(x < -0.2, np.nan, x), "'g' contains NaN or \\+Inf$"),
        ("q", lambda x: np.where(x > 1, np.nan, x), "'q'.*NaN"),
        ("v", lambda x: np.where(x > 1, np.inf, x), "'v'.*NaN or Inf"),
        ("q", lambda x: x[0], "'q'"),
    ],
)
def test_bad_arguments(name, change, match):
    args = _delta_args()
    args[name] = change(args[name])
    with pytest.raises(ValueError, match=match):
        _gated(args)


def test_g_minus_inf_is_accepted_by_validation():
    args = _delta_args()
    args["g"][0, 4, 1] = -np.inf
    _validate.require_finite("g", args["g"], neg_inf_allowed=True)
    _validate.require_log_decay("g", args["g"])
    with pytest.raises(ValueError, match=r"'g' must be <= 0.*g\[0, 4, 1\] = 0\.25"):
        _validate.require_log_decay("g", np.where(args["g"] == -np.inf, 0.25, args["g"]))


@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf])
def test_non_finite_scale_is_refused(scale):
    args = _delta_args()
    with pytest.raises(ValueError, match=r"'scale' must be a finite real number"):
        _gated(args, scale=scale)


@pytest.mark.parametrize("scale", ["big", 1j])
def test_non_real_scale_is_refused(scale):
    with pytest.raises((TypeError, ValueError), match="'scale' must be a"):
        _gated(_delta_args(), scale=scale)


@pytest.mark.parametrize("name", ["q", "k", "v", "beta", "g"])
def test_missing_delta_arrays_raise_type_error(name):
    args = _delta_args()
    args[name] = None
    with pytest.raises(TypeError, match=f"'{name}' is required"):
        _gated(args)
    if name != "g":
        with pytest.raises(TypeError, match=f"'{name}' is required"):
            dplr.delta_rule(args["q"], args["k"], args["v"], args["beta"])


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([0, 7, 5, 12], "never decrease"),
        ([0, 5, 11], "end at T = 12"),
        ([1, 5, 12], "start at 0"),
        ([12], "N \\+ 1 >= 2"),
        ([0.0, 12.0], "integer"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    args = _delta_args()
    with pytest.raises(ValueError, match=match):
        dplr.delta_rule(args["q"], args["k"], args["v"], args["beta"], cu_seqlens=np.array(cu))


def test_large_finite_values_are_not_mistaken_for_inf():
    """The finiteness check must not trip on a sum that overflows."""
    big = {n: x.astype(np.float32) for n, x in _delta_args().items()}
    big["q"] = np.full_like(big["q"], 1e38)  # the sum overflows float32, o does not
    big["v"] = big["v"] * 1e-10
    o, _ = _gated(big)
    assert np.isfinite(o).all()


def test_cu_seqlens_needs_one_batch_and_matching_states():
    args = _delta_args()
    s0 = np.zeros((1, 2, 3, 2))
    two = {n: np.concatenate([x, x]) for n, x in args.items()}
    with pytest.raises(ValueError, match="B == 1"):
        dplr.delta_rule(two["q"], two["k"], two["v"], two["beta"], cu_seqlens=[0, 12])
    with pytest.raises(ValueError, match="initial_state"):
        dplr.delta_rule(args["q"], args["k"], args["v"], args["beta"], initial_state=s0,
                        cu_seqlens=[0, 4, 12])  # fmt: skip


# ------------------------------------------------------------ one wording each
def test_one_wording_for_non_finite_values():
    """The same sentence for every argument and entry point; the hint only where
    the function has ``check_finite``."""
    q, k = _ops()
    messages = {}
    for name, call in {
        "core": lambda: dplr.LowRankTril(np.full((5, 2), np.nan), k),
        "solve": lambda: dplr.LowRankTril(q, k).solve(np.full(5, np.inf)),
        "delta": lambda: _gated({**_delta_args(), "q": np.full((1, 12, 2, 3), np.nan)}),
    }.items():
        with pytest.raises(ValueError) as info:
            call()
        messages[name] = str(info.value)
    assert messages["core"] == str(_validate.not_finite_error("q"))
    assert messages["solve"] == str(_validate.not_finite_error("v"))
    assert messages["delta"] == str(_validate.not_finite_error("q", skippable=False))
    hint = "(pass check_finite=False to skip this check)"
    assert messages["core"] == f"'q' contains NaN or Inf {hint}"


def test_helpers_name_the_argument():
    with pytest.raises(ValueError, match=r"'errors' must be one of \('raise', 'flag'\); got 'x'"):
        _validate.check_choice("errors", "x", ("raise", "flag"))
    _validate.check_choice("errors", "flag", ("raise", "flag"))
    with pytest.raises(ValueError, match=r"'count' must be in \[1, 3\]; got 0"):
        _validate.int_in_range("count", 0, 1, 3)
    with pytest.raises(ValueError, match=r"'index' must be an integer; got 1\.5"):
        _validate.int_in_range("index", 1.5, 0, 3)
    assert _validate.int_in_range("index", np.int64(2), 0, 3) == 2
    assert _validate.finite_scalar("scale", np.float32(0.5)) == 0.5
    assert _validate.positive_int("chunk_size", None) is None
    with pytest.raises(ValueError, match="'chunk_size' must be a positive integer; got True"):
        _validate.positive_int("chunk_size", True)
    err = _validate.shape_error("u", "(..., 4, M)", (3, 2), " to match 'factor'")
    assert str(err) == "'u' must have shape (..., 4, M) to match 'factor'; got shape (3, 2)"
    with pytest.raises(TypeError, match="'multiplier' must be a real floating or integer"):
        raise _validate.dtype_kind_error("multiplier", np.dtype(complex))
