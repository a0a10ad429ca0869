"""Accuracy of every Cholesky method on ill-conditioned factors, and of dplr.cholesky._blocked.

References are built here: ``numpy.linalg.cholesky`` and products of the
factors.  Bounds (``chol_families``): backward error <= 1e-14 in float64 and
45 eps in float32 whatever cond(L).  The unstable ``L chol(I + W W^T)``
product this replaced measured 2e-11 (noise 1e-6) to 4e-5 (noise 1e-12) on
the same families, and raised on downdates at noise <= 1e-8.
"""

from __future__ import annotations

import numpy as np
import pytest
from chol_families import (
    BOUND32,
    BOUND64,
    NOISES,
    assert_factor_shape,
    backward_error,
    rbf,
)

import dplr
from dplr._runtime.backend import NumpyOps
from dplr.cholesky import _blocked

METHODS = ["auto", "rank1", "blocked", "refactor"]


def _orient(a, lower):
    return a if lower else np.ascontiguousarray(np.swapaxes(a, -1, -2))


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_update_ill_conditioned_gp(method, lower):
    rng = np.random.default_rng(0)
    n, m = 160, 16
    for noise in NOISES:
        a = rbf(n, noise)
        L = np.linalg.cholesky(a)
        u = rng.standard_normal((n, m))
        new = dplr.cholesky_update(_orient(L, lower), u, lower=lower, method=method)
        assert_factor_shape(new, lower)
        err = backward_error(new, a + u @ u.T, lower=lower)
        assert err <= BOUND64, (noise, err)


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_downdate_ill_conditioned_gp(method, lower):
    # A = K + U U^T, downdated back to K: error relative to ||A||
    rng = np.random.default_rng(1)
    n, m = 200, 24
    for noise in NOISES:
        k = rbf(n, noise)
        u = 0.1 * rng.standard_normal((n, m))
        a = k + u @ u.T
        L = _orient(np.linalg.cholesky(a), lower)
        back = dplr.cholesky_downdate(L, u, lower=lower, method=method)
        assert_factor_shape(back, lower)
        err = backward_error(back, k, np.linalg.norm(a), lower=lower)
        assert err <= BOUND64, (noise, err)


@pytest.mark.parametrize("method", METHODS)
def test_batched_gp_mixed_signs(method):
    # two factors of different conditioning; weights +1 and -1 per column
    rng = np.random.default_rng(2)
    n, m = 90, 6
    k = np.stack([rbf(n, 1e-10), rbf(n, 1e-4)])
    u = 0.1 * rng.standard_normal((2, n, m))
    w = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    down = u[..., 1::2]
    a = k + down @ np.swapaxes(down, -1, -2)  # the downdated columns were added before
    b = a + (u * w) @ np.swapaxes(u, -1, -2)
    new = dplr.cholesky_update(np.linalg.cholesky(a), u, w, method=method)
    assert_factor_shape(new)
    assert np.all(backward_error(new, b, np.linalg.norm(a, axis=(-2, -1))) <= BOUND64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tiny", [1e-8, 1e-12, 1e-300])
def test_tiny_diagonal_entry(method, tiny):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 8))
    L = np.linalg.cholesky(x @ x.T + 8 * np.eye(8))
    L[4, 4] = tiny
    u = rng.standard_normal((8, 3))
    b = L @ L.T + u @ u.T
    new = dplr.cholesky_update(L, u, method=method)
    assert_factor_shape(new)
    assert backward_error(new, b) <= BOUND64


@pytest.mark.parametrize("method", METHODS)
def test_identity_with_1e300_diagonal_stays_finite(method):
    L = np.eye(3)
    L[1, 1] = 1e-300
    u = np.ones((3, 2))
    new = dplr.cholesky_update(L, u, method=method)
    assert_factor_shape(new)
    # B = diag(1, 1e-600 -> 0, 1) + 2 * ones: its Cholesky factor, by hand
    ref = np.linalg.cholesky(np.diag([1.0, 0.0, 1.0]) + 2.0)
    np.testing.assert_allclose(new, ref, rtol=0, atol=BOUND64 * 3)


@pytest.mark.parametrize("method", METHODS)
def test_float32_bound(method):
    rng = np.random.default_rng(4)
    n, m = 120, 8
    L = np.linalg.cholesky(rbf(n, 1e-3)).astype(np.float32)
    a = L.astype(np.float64) @ L.T.astype(np.float64)  # exactly the float32 factor's matrix
    u = rng.standard_normal((n, m)).astype(np.float32)
    new = dplr.cholesky_update(L, u, method=method)
    assert new.dtype == np.float32
    u64 = u.astype(np.float64)
    assert backward_error(new, a + u64 @ u64.T) <= BOUND32
    b = a + u64 @ u64.T
    back = dplr.cholesky_downdate(np.linalg.cholesky(b).astype(np.float32), u, method=method)
    assert backward_error(back, a, np.linalg.norm(b)) <= BOUND32


# ------------------------------------------------- the module, block by block
@pytest.mark.parametrize("block", [1, 7, 64, None])
@pytest.mark.parametrize("n", [1, 50, 130])
def test_update_and_downdate_kernels_every_block_size(block, n):
    # block=None: LAPACK's ?tpqrt for the update; otherwise the dense-panel reduction
    rng = np.random.default_rng(5)
    m = 5
    k = rbf(n, 1e-8) if n > 1 else np.eye(1)
    u = 0.1 * rng.standard_normal((n, m))
    a = k + u @ u.T
    L = np.linalg.cholesky(k)
    out = np.full((n, n), 7.0)  # garbage everywhere: every entry must be written
    _blocked.update(NumpyOps, L, u, out, block)
    assert_factor_shape(out)
    assert backward_error(out, a) <= BOUND64
    La = np.linalg.cholesky(a)
    w, s, ok = _blocked.downdate_check(NumpyOps, La, u)
    assert bool(ok)
    _blocked.downdate(NumpyOps, La, w, s, La, block)  # in place
    assert_factor_shape(La)
    assert backward_error(La, k, np.linalg.norm(a)) <= BOUND64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "panel"), [(70, 8), (70, 16), (33, 32), (600, None)])
def test_update_by_panels_split_over_threads(monkeypatch, dtype, n, panel):
    """The LAPACK update by panels whose trailing columns are split over threads
    (small panels force many panels and splits at small N; N = 600 runs the
    shipped panel width), into new zero-filled memory and into garbage."""
    if panel is not None:
        monkeypatch.setattr(_blocked, "PANEL_COLUMNS", panel)
    rng = np.random.default_rng(n + (panel or 0))
    m = 6
    k = rbf(n, 1e-8)
    u = rng.standard_normal((n, m))
    a = k + u @ u.T
    L = np.linalg.cholesky(k).astype(dtype)
    bound = BOUND64 if dtype == np.float64 else BOUND32
    for out, zero in ((np.zeros((n, n), dtype), True), (np.full((n, n), 7.0, dtype), False)):
        _blocked.update(NumpyOps, L, u.astype(dtype), out, None, out_zero=zero)
        assert_factor_shape(out)
        assert backward_error(out, a.astype(dtype)) <= bound
    new = dplr.cholesky_update(L, u.astype(dtype), method="blocked")
    assert_factor_shape(new)
    assert backward_error(new, a.astype(dtype)) <= bound


def test_update_kernel_batched_and_garbage_above_the_diagonal():
    rng = np.random.default_rng(6)
    n, m = 70, 3
    k = np.stack([rbf(n, 1e-6), rbf(n, 1e-10), np.eye(n)])
    L = np.linalg.cholesky(k) + np.triu(np.full((n, n), np.nan), 1)  # other triangle not read
    u = rng.standard_normal((3, n, m))
    b = k + u @ np.swapaxes(u, -1, -2)
    for block in (None, 16):
        out = np.empty_like(L)
        _blocked.update(NumpyOps, L, u, out, block)
        assert_factor_shape(out)
        assert np.all(backward_error(out, b) <= BOUND64)


def test_downdate_check_is_the_definiteness_of_the_result():
    rng = np.random.default_rng(7)
    n = 40
    L = np.linalg.cholesky(rbf(n, 1e-2))
    u = rng.standard_normal((n, 2))
    for scale in (0.01, 100.0):
        uu = scale * u
        pd = np.linalg.eigvalsh(L @ L.T - uu @ uu.T).min() > 0
        _, _, ok = _blocked.downdate_check(NumpyOps, L, uu)
        assert bool(ok) == pd


@pytest.mark.parametrize("method", ["auto", "blocked", "refactor"])
@pytest.mark.parametrize("lower", [True, False])
def test_torch_same_accuracy(method, lower):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    n, m = 150, 12
    for noise in (1e-6, 1e-12):
        k = rbf(n, noise)
        u = 0.1 * rng.standard_normal((n, m))
        a = k + u @ u.T
        Lk = torch.tensor(_orient(np.linalg.cholesky(k), lower))
        ut = torch.tensor(u)
        new = dplr.cholesky_update(Lk, ut, lower=lower, method=method).numpy()
        assert_factor_shape(new, lower)
        assert backward_error(new, a, lower=lower) <= BOUND64
        La = torch.tensor(_orient(np.linalg.cholesky(a), lower))
        back = dplr.cholesky_downdate(La, ut, lower=lower, method=method).numpy()
        assert_factor_shape(back, lower)
        assert backward_error(back, k, np.linalg.norm(a), lower=lower) <= BOUND64
