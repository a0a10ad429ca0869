"""Tests of dplr.cholesky against numpy.linalg.cholesky of the modified matrix.

Matrices are from a well-conditioned family, ``A = X X^T / n + I`` with
eigenvalues in [1, ~5], and update vectors of norm <= ~1, so that forward
errors are a small multiple of backward errors.  Tolerances (see ``tol``):
Cholesky and each rotation sweep have a backward error of a few ``n * eps``
(Higham, Accuracy and Stability, Thm 10.3; rotations are orthogonal), and a
rank-M modification accumulates up to M such sweeps, so we allow
``20 * (n + m) * eps`` relative to ``||B||``.
"""

from __future__ import annotations

import numpy as np
import pytest
from chol_families import BOUND64, NOISES, backward_error, rbf
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dplr

METHODS = ["rank1", "blocked", "refactor", "auto"]
DTYPES = [np.float32, np.float64]


def tol(dtype, n, m=1):
    """Relative backward-error bound: 20 (n + m) eps (see the module docstring)."""
    return 20 * (n + m) * float(np.finfo(dtype).eps)


def spd(rng, n, batch=(), dtype=np.float64):
    x = rng.standard_normal((*batch, n, n))
    return (x @ np.swapaxes(x, -1, -2) / n + np.eye(n)).astype(dtype)


def chol(a):
    return np.linalg.cholesky(a.astype(np.float64))


def check_factor(new, b, lower=True, m=1):
    """Lower/upper structure, positive diagonal, and backward error vs B."""
    dtype = new.dtype
    n = b.shape[-1]
    low = new if lower else np.swapaxes(new, -1, -2)
    assert np.all(np.triu(low, 1) == 0)
    assert np.all(np.diagonal(low, 0, -2, -1) > 0)
    low = low.astype(np.float64)
    err = np.linalg.norm(low @ np.swapaxes(low, -1, -2) - b, axis=(-2, -1))
    assert np.all(err <= tol(dtype, n, m) * np.linalg.norm(b, axis=(-2, -1))), err
    ref = chol(b)
    assert np.allclose(low, ref, rtol=0, atol=5 * tol(dtype, n, m) * np.abs(ref).max())


def orient(L, lower):
    return L if lower else np.ascontiguousarray(np.swapaxes(L, -1, -2))


SIZES = [(1, 1), (1, 3), (2, 1), (2, 3), (5, 9), (67, 1), (67, 5), (130, 4)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m"), SIZES)
def test_update_downdate_mixed(method, lower, dtype, n, m):
    rng = np.random.default_rng(n * 100 + m)
    a = spd(rng, n)
    u = rng.standard_normal((n, m)) / np.sqrt(n * m)
    L = orient(chol(a), lower).astype(dtype)
    b = a + u @ u.T
    new = dplr.cholesky_update(L, u.astype(dtype), lower=lower, method=method)
    assert new.dtype == dtype
    check_factor(new, b, lower, m)
    # downdate the factor of B back to A
    Lb = orient(chol(b), lower).astype(dtype)
    back = dplr.cholesky_downdate(Lb, u.astype(dtype), lower=lower, method=method)
    check_factor(back, a, lower, m)
    # mixed signs, one weight per column
    w = np.where(np.arange(m) % 2 == 0, 2.0, -0.5)
    mixed = dplr.cholesky_update(L, u.astype(dtype), w.astype(dtype), lower=lower, method=method)
    check_factor(mixed, a + (u * w) @ u.T, lower, m)


def test_rank1_vector_and_scalar_multiplier():
    rng = np.random.default_rng(0)
    a = spd(rng, 9)
    u = rng.standard_normal(9) / 3
    new = dplr.cholesky_update(chol(a), u, 0.7)
    check_factor(new, a + 0.7 * np.outer(u, u))
    down = dplr.cholesky_downdate(chol(a), u, 0.7)
    check_factor(down, a - 0.7 * np.outer(u, u))


def test_one_by_one_downdate_edge():
    L = np.array([[2.0]])
    np.testing.assert_allclose(dplr.cholesky_downdate(L, np.array([1.0])), [[np.sqrt(3.0)]])
    for method in ["rank1", "blocked", "refactor"]:
        for x in (2.0, 3.0):  # exactly singular, then indefinite
            with pytest.raises(dplr.NotPositiveDefiniteError):
                dplr.cholesky_downdate(L, np.array([x]), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_batch_broadcasting(method):
    rng = np.random.default_rng(1)
    n, m = 12, 3
    a = spd(rng, n, (3, 1))
    u = rng.standard_normal((1, 4, n, m)) / 6
    w = rng.uniform(0.5, 2.0, (3, 4, m))
    new = dplr.cholesky_update(chol(a), u, w, method=method)
    assert new.shape == (3, 4, n, n)
    check_factor(new, a + (u * w[..., None, :]) @ np.swapaxes(u, -1, -2), m=m)
    # rank 1 batch of vectors (spelled v[..., None]), one weight per batch entry
    v = rng.standard_normal((4, n)) / 4
    per_entry = np.array([1.0, 2.0, 0.5, 1.0])[:, None]
    new1 = dplr.cholesky_update(chol(a), v[..., None], per_entry, method=method)
    mult = np.array([1.0, 2.0, 0.5, 1.0])[:, None, None]
    check_factor(new1, a + mult * v[:, :, None] * v[:, None, :])


def test_backward_error_larger_blocked_and_rank1():
    rng = np.random.default_rng(4)
    n, m = 300, 24
    a = spd(rng, n)
    u = rng.standard_normal((n, m)) / np.sqrt(n)
    for dtype in DTYPES:
        for method in ["blocked", "rank1"]:
            new = dplr.cholesky_update(chol(a).astype(dtype), u.astype(dtype), method=method)
            check_factor(new, a + u @ u.T, m=m)


# ------------------------------------------------------------- failure handling
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_indefinite_downdate_raises_and_leaves_input(method, overwrite, m):
    rng = np.random.default_rng(5)
    n = 40
    L = chol(spd(rng, n))
    u = rng.standard_normal((n, m)) * 3  # clearly too large
    L_before, u_before = L.copy(), u.copy()
    with pytest.raises(dplr.NotPositiveDefiniteError) as info:
        dplr.cholesky_downdate(L, u, method=method, overwrite=overwrite)
    assert info.value.batch_indices == ((),)
    assert isinstance(info.value, np.linalg.LinAlgError)
    assert L.tobytes() == L_before.tobytes() and u.tobytes() == u_before.tobytes()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_flag_with_some_entries_failing(method, overwrite, m):
    rng = np.random.default_rng(6)
    n = 30
    a = spd(rng, n, (5,))
    L = chol(a)
    u = rng.standard_normal((5, n, m)) / (4 * np.sqrt(n * m))
    bad = np.array([False, True, False, False, True])
    u[bad] *= 40
    L_before = L.copy()
    new, ok = dplr.cholesky_downdate(L, u, method=method, errors="flag", overwrite=overwrite)
    np.testing.assert_array_equal(ok, ~bad)
    check_factor(new[~bad], a[~bad] - u[~bad] @ np.swapaxes(u[~bad], -1, -2), m=m)
    assert new[bad].tobytes() == L_before[bad].tobytes()
    if overwrite:
        assert np.shares_memory(new, L)
        assert L[bad].tobytes() == L_before[bad].tobytes()
    else:
        assert L.tobytes() == L_before.tobytes()
    with pytest.raises(dplr.NotPositiveDefiniteError) as info:
        dplr.cholesky_downdate(L_before, u, method=method)
    assert info.value.batch_indices == ((1,), (4,))
    assert "(1,), (4,)" in str(info.value)


# ------------------------------------------------------- memory and layouts
@pytest.mark.parametrize("method", ["rank1", "blocked", "refactor"])
def test_inputs_never_modified_without_overwrite(method):
    rng = np.random.default_rng(7)
    n, m = 20, 2
    a = spd(rng, n)
    L = chol(a) + np.triu(rng.standard_normal((n, n)), 1)  # garbage in the other triangle
    u = rng.standard_normal((n, m)) / 10
    w = np.array([1.0, -0.5])
    copies = [x.copy() for x in (L, u, w)]
    new = dplr.cholesky_update(L, u, w, method=method)
    for x, c in zip((L, u, w), copies, strict=True):
        assert x.tobytes() == c.tobytes()
    check_factor(new, a + (u * w) @ u.T, m=m)


@pytest.mark.parametrize("method", ["rank1", "blocked"])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("lower", [True, False])
def test_layouts(method, layout, lower):
    rng = np.random.default_rng(8)
    n, m = 33, 3
    a = spd(rng, n)
    L = orient(chol(a), lower)
    if layout == "F":
        L = np.asfortranarray(L)
    elif layout == "strided":
        big = np.zeros((2 * n, 3 * n))
        big[::2, ::3] = L
        L = big[::2, ::3]
    u_big = rng.standard_normal((n, 2 * m)) / 10
    u = u_big[:, ::2]
    new = dplr.cholesky_update(L, u, method=method, lower=lower)
    check_factor(new, a + u @ u.T, lower, m)


@pytest.mark.parametrize("method", ["rank1", "blocked", "refactor"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("m", "sign"), [(1, 1), (1, -1), (4, 1), (4, -1)])
def test_overwrite_success_shares_memory(method, order, m, sign):
    rng = np.random.default_rng(9)
    n = 70
    a = spd(rng, n)
    u = rng.standard_normal((n, m)) / (3 * np.sqrt(n * m))
    L = np.array(chol(a), order=order)
    new = dplr.cholesky_update(L, u, float(sign), method=method, overwrite=True)
    assert np.shares_memory(new, L)
    check_factor(new, a + sign * u @ u.T, m=m)
    # no overwrite without permission, nor when a conversion is needed
    L32 = chol(a).astype(np.float32)
    out = dplr.cholesky_update(L32, u, overwrite=False, method=method)
    assert not np.shares_memory(out, L32)


# ----------------------------------------------------------------- bad input
def test_bad_input_messages():
    L = chol(spd(np.random.default_rng(10), 4))
    u = np.ones(4) / 10
    with pytest.raises(ValueError, match="'factor' must be square"):
        dplr.cholesky_update(np.ones((4, 3)), u)
    with pytest.raises(ValueError, match="'u' must have shape"):
        dplr.cholesky_update(L, np.ones(5))
    for d in (0.0, -1.0):
        bad = L.copy()
        bad[2, 2] = d
        with pytest.raises(ValueError, match=r"positive diagonal.*diagonal entry \[2\]"):
            dplr.cholesky_update(bad, u)
    for method in ("rank1", "blocked", "refactor"):
        for overwrite in (False, True):
            bad = L.copy()
            bad[3, 1] = np.nan
            before = bad.tobytes()
            with pytest.raises(ValueError, match="'factor' contains NaN"):
                dplr.cholesky_update(bad, u, method=method, overwrite=overwrite)
            assert bad.tobytes() == before
    with pytest.raises(ValueError, match="'u' contains NaN"):
        dplr.cholesky_update(L, np.full(4, np.inf))
    with pytest.raises(ValueError, match="'method'"):
        dplr.cholesky_update(L, u, method="qr")
    with pytest.raises(ValueError, match="'errors'"):
        dplr.cholesky_update(L, u, errors="ignore")
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        dplr.cholesky_update(np.stack([L, L]), np.ones((3, 4, 1)) / 10)
    with pytest.raises(TypeError):
        dplr.cholesky_update(L, u, multiplier="x")
    # the other triangle is not read, not even for NaN
    junk = L + np.triu(np.full((4, 4), np.nan), 1)
    check_factor(dplr.cholesky_update(junk, u), L @ L.T + np.outer(u, u))


def test_integers_promote_to_float64():
    L = np.array([[2, 0], [1, 3]])
    new = dplr.cholesky_update(L, np.array([1, 1]))
    assert new.dtype == np.float64
    check_factor(new, (L @ L.T + 1).astype(np.float64))


# ----------------------------------------------------------- insert / delete
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(
    ("n", "index", "p"), [(5, 0, 1), (5, 2, 2), (5, 5, 1), (1, 1, 3), (70, 30, 3)]
)
def test_insert(lower, n, index, p):
    rng = np.random.default_rng(11)
    big = spd(rng, n + p)
    keep = [i for i in range(n + p) if not index <= i < index + p]
    small = orient(chol(big[np.ix_(keep, keep)]), lower)
    new = dplr.cholesky_insert(small, index, big[:, index : index + p], lower=lower)
    check_factor(new, big, lower, p)


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(
    ("n", "index", "count"), [(5, 0, 1), (5, 2, 2), (5, 4, 1), (2, 0, 1), (70, 3, 5)]
)
def test_delete(lower, n, index, count):
    rng = np.random.default_rng(12)
    a = spd(rng, n)
    keep = [i for i in range(n) if not index <= i < index + count]
    new = dplr.cholesky_delete(orient(chol(a), lower), index, count, lower=lower)
    check_factor(new, a[np.ix_(keep, keep)], lower, count)


def test_insert_delete_errors():
    rng = np.random.default_rng(13)
    L = chol(spd(rng, 4))
    with pytest.raises(ValueError, match="'index' must be in"):
        dplr.cholesky_delete(L, 4)
    with pytest.raises(ValueError, match="'count' must be in"):
        dplr.cholesky_delete(L, 0, 4)
    with pytest.raises(ValueError, match="'index' must be in"):
        dplr.cholesky_insert(L, 5, np.ones((5, 1)))
    with pytest.raises(ValueError, match="'cols' must have shape"):
        dplr.cholesky_insert(L, 0, np.ones((4, 1)))
    cols = np.zeros((5, 1))
    cols[0, 0] = -1.0  # a negative new diagonal entry: not positive definite
    with pytest.raises(dplr.NotPositiveDefiniteError):
        dplr.cholesky_insert(L, 0, cols)
    good = np.full((5, 1), 0.1)
    good[0, 0] = 10.0
    new, ok = dplr.cholesky_insert(np.stack([L, L]), 0, np.stack([cols, good]), errors="flag")
    np.testing.assert_array_equal(ok, [False, True])
    assert np.isnan(new[0]).all() and np.isfinite(new[1]).all()


# ------------------------------------------------- nothing written on failure
# Every path: blocked with N over three panels (the failing rows are the last
# ones), rank-1 sweeps below and above the small-factor switch (64), batched.
FAIL_PATHS = [("blocked", 150, 3), ("auto", 150, 12), ("rank1", 30, 1), ("rank1", 100, 1),
              ("rank1", 100, 3), ("refactor", 100, 3), ("auto", 100, 1)]  # fmt: skip


@pytest.mark.parametrize(("method", "n", "m"), FAIL_PATHS)
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("order", ["C", "F"])
def test_failed_batched_downdate_writes_nothing(method, n, m, overwrite, order):
    rng = np.random.default_rng(20)
    a = spd(rng, n, (3,))
    L = chol(a)
    L = np.asfortranarray(L.transpose(1, 2, 0)).transpose(2, 0, 1) if order == "F" else L
    u = rng.standard_normal((3, n, m)) / (4 * np.sqrt(n * m))
    u[1, n - 10 :] *= 400  # entry 1 fails, from its last rows
    before, u_before = L.copy(), u.copy()
    with pytest.raises(dplr.NotPositiveDefiniteError) as info:
        dplr.cholesky_downdate(L, u, method=method, overwrite=overwrite)
    assert info.value.batch_indices == ((1,),)
    assert L.tobytes() == before.tobytes() and u.tobytes() == u_before.tobytes()
    new, ok = dplr.cholesky_downdate(L, u, method=method, overwrite=overwrite, errors="flag")
    np.testing.assert_array_equal(ok, [True, False, True])
    assert new[1].tobytes() == before[1].tobytes() and L[1].tobytes() == before[1].tobytes()
    check_factor(new[::2], a[::2] - u[::2] @ np.swapaxes(u[::2], -1, -2), m=m)
    assert np.shares_memory(new, L) == overwrite or not overwrite


@pytest.mark.parametrize("method", METHODS)
def test_failed_downdate_of_a_stack_of_identities(method):
    L = np.stack([2 * np.eye(3)] * 2)
    before = L.copy()
    with pytest.raises(dplr.NotPositiveDefiniteError):
        dplr.cholesky_downdate(L, np.array([[1.0, 0, 0], [3.0, 0, 0]])[..., None],
                               method=method, overwrite=True)  # fmt: skip
    assert L.tobytes() == before.tobytes()


# ------------------------------------------------------------ property tests
# n up to 150 reaches the second and third panel of the blocked path (64 rows)
# and the rank-1 sweeps above their small-factor switch; the families include
# the ill-conditioned GP kernels.  Bounds: BOUND64 (chol_families).
_sizes = st.tuples(st.integers(1, 150), st.integers(1, 5), st.integers(0, 2**31 - 1))
_family = st.sampled_from([None, *NOISES])


def _matrix(rng, n, noise):
    return spd(rng, n) if noise is None else rbf(n, noise)


@settings(max_examples=30, deadline=None)
@given(_sizes, st.sampled_from(METHODS), st.booleans(), _family)
def test_property_update_then_downdate(sizes, method, lower, noise):
    n, m, seed = sizes
    rng = np.random.default_rng(seed)
    a = _matrix(rng, n, noise)
    u = rng.standard_normal((n, m))
    b = a + u @ u.T
    up = dplr.cholesky_update(orient(chol(a), lower), u, method=method, lower=lower)
    assert backward_error(up, b, lower=lower) <= BOUND64
    back = dplr.cholesky_downdate(orient(chol(b), lower), u, method=method, lower=lower)
    assert backward_error(back, a, np.linalg.norm(b), lower=lower) <= BOUND64


@settings(max_examples=30, deadline=None)
@given(_sizes, st.sampled_from(METHODS), st.floats(0.1, 10.0), _family)
def test_property_downdate_fails_iff_indefinite_and_then_writes_nothing(sizes, method, scale,
                                                                        noise):  # fmt: skip
    n, m, seed = sizes
    rng = np.random.default_rng(seed)
    a = _matrix(rng, n, noise)
    u = scale * rng.standard_normal((n, m)) / np.sqrt(n)
    smallest = np.linalg.eigvalsh(a - u @ u.T).min()
    assume(abs(smallest) > 1e-6 * np.linalg.norm(a))  # clearly definite or clearly not
    # a batch with a second entry that always succeeds: ||u2||^2 = lambda_min(A) / 2
    L = np.stack([chol(a), chol(a)])
    u2 = u * np.sqrt(np.linalg.eigvalsh(a)[0] / 2) / np.linalg.norm(u, 2)
    uu = np.stack([u, u2])
    before = L.copy()
    if smallest > 0:
        new = dplr.cholesky_downdate(L, uu, method=method, overwrite=True)
        b = np.stack([a, a]) - uu @ np.swapaxes(uu, -1, -2)
        assert np.all(backward_error(new, b, np.linalg.norm(a)) <= BOUND64)
    else:
        with pytest.raises(dplr.NotPositiveDefiniteError):
            dplr.cholesky_downdate(L, uu, method=method, overwrite=True)
        assert L.tobytes() == before.tobytes()
        new, ok = dplr.cholesky_downdate(L, uu, method=method, overwrite=True, errors="flag")
        np.testing.assert_array_equal(ok, [False, True])
        assert L[0].tobytes() == before[0].tobytes()


@settings(max_examples=25, deadline=None)
@given(_sizes, st.data())
def test_property_insert_then_delete_and_delete_is_submatrix(sizes, data):
    n, p, seed = sizes
    rng = np.random.default_rng(seed)
    big = spd(rng, n + p)
    index = data.draw(st.integers(0, n))
    L = chol(big)
    removed = dplr.cholesky_delete(L, index, p)
    keep = [i for i in range(n + p) if not index <= i < index + p]
    np.testing.assert_allclose(removed, chol(big[np.ix_(keep, keep)]), atol=tol(np.float64, n, p))
    again = dplr.cholesky_insert(removed, index, big[:, index : index + p])
    np.testing.assert_allclose(again, L, atol=5 * tol(np.float64, n, p))


# --------------------------------------------------------------------- torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lower", [True, False])
def test_torch_blocked_and_auto(dtype, lower):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    n, m = 70, 3
    a = spd(rng, n, (2,))
    u = rng.standard_normal((2, n, m)) / 10
    L = torch.tensor(orient(chol(a), lower), dtype=getattr(torch, dtype))
    ut = torch.tensor(u, dtype=getattr(torch, dtype))
    for method in ("blocked", "auto", "refactor"):
        new = dplr.cholesky_update(L, ut, lower=lower, method=method)
        assert isinstance(new, torch.Tensor) and new.dtype == L.dtype
        check_factor(new.numpy(), a + u @ np.swapaxes(u, -1, -2), lower, m)
    new, ok = dplr.cholesky_downdate(L, ut * 50, lower=lower, errors="flag")
    assert isinstance(ok, torch.Tensor) and not bool(ok.any())
    assert torch.equal(new, L)  # failed entries hold the input factor
    with pytest.raises(ValueError, match="rank1"):
        dplr.cholesky_update(L, ut, method="rank1")
    with pytest.raises(dplr.NotPositiveDefiniteError):
        dplr.cholesky_downdate(L, ut * 50, lower=lower)


_BLAS_LIMIT_SCRIPT = """
import numpy as np, dplr
from threadpoolctl import threadpool_info
rng = np.random.default_rng(0)
dplr.LowRankTril(rng.standard_normal((50, 3)), rng.standard_normal((50, 3))).solve(np.ones(50))
L = np.linalg.cholesky(np.eye(40) * 2)
dplr.cholesky_update(L, rng.standard_normal((40, 9)) * 0.1, method="blocked")
from dplr._runtime.blas import controlled_libraries
limited = set(controlled_libraries())
loaded = {info["filepath"] for info in threadpool_info() if info["user_api"] == "blas"}
print(sorted(loaded - limited))
"""


def test_every_blas_in_use_is_under_dplr_thread_control():
    # A fresh process whose first dplr call precedes any scipy.linalg use:
    # SciPy's own BLAS must still be among the libraries dplr limits (it once
    # was not, and small triangular solves then ran multi-threaded, 16x slower).
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _BLAS_LIMIT_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
def test_blocked_update_checks_the_factor_while_copying_it(dtype, bad_value):
    """The LAPACK update into new memory checks the lower triangle in its copy
    pass: a non-finite entry of any batch entry raises, the input unchanged;
    the upper triangle is not read."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 40, 40))
    L = np.linalg.cholesky(a @ np.swapaxes(a, -1, -2) + 40 * np.eye(40)).astype(dtype)
    u = rng.standard_normal((3, 40, 2)).astype(dtype)
    bad = L.copy()
    bad[2, 39, 0] = bad_value
    before = bad.tobytes()
    with pytest.raises(ValueError, match="'factor' contains NaN or Inf"):
        dplr.cholesky_update(bad, u, method="blocked")
    assert bad.tobytes() == before
    junk = L + np.triu(np.full((40, 40), bad_value), 1).astype(dtype)
    got = dplr.cholesky_update(junk, u, method="blocked")
    want = np.linalg.cholesky(
        (L @ np.swapaxes(L, -1, -2) + u @ np.swapaxes(u, -1, -2)).astype(np.float64)
    )
    assert np.abs(got - want).max() <= 100 * 40 * np.finfo(dtype).eps * np.abs(want).max()
