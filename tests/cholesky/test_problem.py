"""Operand shapes of the Cholesky modifications: u and weight rules, empty sizes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from chol_families import BOUND64, assert_factor_shape, backward_error, rbf

import dplr

METHODS = ["auto", "rank1", "blocked", "refactor"]


def _factors(rng, batch, n):
    x = rng.standard_normal((*batch, n, n))
    return np.linalg.cholesky(x @ np.swapaxes(x, -1, -2) / n + np.eye(n))


@pytest.mark.parametrize("method", METHODS)
def test_no_columns_returns_the_factor(method):
    L = np.linalg.cholesky(rbf(6, 1e-2)) + np.triu(np.ones((6, 6)), 1)
    before = L.copy()
    new = dplr.cholesky_update(L, np.zeros((6, 0)), method=method)
    np.testing.assert_array_equal(new, np.tril(before))
    assert not np.shares_memory(new, L) and np.array_equal(L, before)
    new, ok = dplr.cholesky_downdate(L[None], np.zeros((1, 6, 0)), errors="flag", method=method)
    assert new.shape == (1, 6, 6) and ok.shape == (1,) and bool(ok.all())


@pytest.mark.parametrize("method", METHODS)
def test_empty_factor_returns_empty(method):
    new = dplr.cholesky_update(np.zeros((0, 0)), np.zeros((0, 2)), method=method)
    assert new.shape == (0, 0)
    new, ok = dplr.cholesky_downdate(np.zeros((3, 0, 0)), np.zeros(0), errors="flag")
    assert new.shape == (3, 0, 0) and ok.shape == (3,) and bool(ok.all())


@pytest.mark.parametrize("method", METHODS)
def test_square_u_of_a_batch_is_one_rank_m_update_per_factor(method):
    # four 4x4 factors and u of shape (4, 4): a rank-4 update of each factor
    rng = np.random.default_rng(0)
    L = _factors(rng, (4,), 4)
    u = 0.3 * rng.standard_normal((4, 4))
    a = L @ np.swapaxes(L, -1, -2)
    new = dplr.cholesky_update(L, u, method=method)
    assert np.all(backward_error(new, a + u @ u.T) <= BOUND64)


@pytest.mark.parametrize("method", METHODS)
def test_batched_rank1_updates_as_tfp_spells_them(method):
    # TFP: cholesky_update(chol, update_vector, multiplier), chol (B, N, N),
    # update_vector (B, N), multiplier (B,)  ->  dplr: u[..., None], multiplier[..., None]
    rng = np.random.default_rng(1)
    L = _factors(rng, (4,), 4)
    v = 0.3 * rng.standard_normal((4, 4))
    mult = np.array([1.0, 0.5, 2.0, 0.25])
    new = dplr.cholesky_update(L, v[..., None], mult[..., None], method=method)
    for i in range(4):  # one rank-1 update per factor, by the definition
        b = L[i] @ L[i].T + mult[i] * np.outer(v[i], v[i])
        assert backward_error(new[i], b) <= BOUND64


def test_u_rule_messages():
    L = _factors(np.random.default_rng(2), (2,), 5)
    with pytest.raises(ValueError, match=r"u\[\.\.\., None\]"):
        dplr.cholesky_update(L, np.ones((2, 5)))  # a batch of vectors must say so
    with pytest.raises(ValueError, match=r"'u' must have shape \(5,\)"):
        dplr.cholesky_update(L, np.ones(4))
    with pytest.raises(ValueError, match="'u' must have shape"):
        dplr.cholesky_update(L, np.ones((2, 3, 4)))


def test_multiplier_rule():
    rng = np.random.default_rng(3)
    L = _factors(rng, (4,), 4)
    u = 0.2 * rng.standard_normal((4, 4, 3))
    # one weight per column: (M,) broadcasts over the batch
    w = np.array([1.0, 2.0, 0.5])
    new = dplr.cholesky_update(L, u, w)
    b = L @ np.swapaxes(L, -1, -2) + (u * w) @ np.swapaxes(u, -1, -2)
    assert np.all(backward_error(new, b) <= BOUND64)
    # (4,) with M = 3: not per-column weights; the message shows the per-entry spelling
    with pytest.raises(ValueError, match=r"multiplier\[\.\.\., None\]"):
        dplr.cholesky_update(L, u, np.ones(4))
    # (4,) with M = 4 and a batch of 4: two readings, both named
    u4 = 0.2 * rng.standard_normal((4, 4, 4))
    with pytest.raises(ValueError, match=r"two ways.*per column.*per batch entry"):
        dplr.cholesky_update(L, u4, np.ones(4))
    full = np.tile(np.array([1.0, 2.0, 0.5, 1.5]), (4, 1))  # the unambiguous spelling
    new = dplr.cholesky_update(L, u4, full)
    b = L @ np.swapaxes(L, -1, -2) + (u4 * full[:, None, :]) @ np.swapaxes(u4, -1, -2)
    assert np.all(backward_error(new, b) <= BOUND64)
    per_entry = dplr.cholesky_update(L, u4, np.full((4, 1), 0.5))
    b = L @ np.swapaxes(L, -1, -2) + 0.5 * u4 @ np.swapaxes(u4, -1, -2)
    assert np.all(backward_error(per_entry, b) <= BOUND64)


@pytest.mark.parametrize("method", METHODS)
def test_bad_values_raise_and_leave_inputs_untouched(method):
    rng = np.random.default_rng(4)
    L = _factors(rng, (), 6)
    u = 0.1 * rng.standard_normal((6, 2))
    cases = [
        (L, np.where(np.arange(12).reshape(6, 2) == 3, np.nan, u), 1.0, ValueError, "'u'"),
        (np.where(np.eye(6) == 1, L, L) * np.nan, u, 1.0, ValueError, "'factor'"),
        (L, u, np.array([1.0, np.inf]), ValueError, "'multiplier'"),
        (L.astype(complex), u, 1.0, TypeError, "complex|real"),
        (L, u, "x", TypeError, "multiplier"),
        (L[:, :5], u, 1.0, ValueError, "'factor' must be square"),
    ]
    for f, uu, w, exc, pattern in cases:
        copies = [np.array(x, copy=True) for x in (f, uu, w)]
        with pytest.raises(exc, match=pattern):
            dplr.cholesky_update(f, uu, w, method=method, overwrite=True)
        for x, c in zip((f, uu, w), copies, strict=True):
            assert np.array_equal(np.asarray(x), c, equal_nan=x is not w or c.dtype.kind == "f")


def test_delete_from_one_by_one_says_so():
    with pytest.raises(ValueError, match=r"1 x 1.*N >= 2"):
        dplr.cholesky_delete(np.eye(1), 0)
    new = dplr.cholesky_delete(np.eye(2) * 3, 0)
    assert_factor_shape(new)
    np.testing.assert_array_equal(new, [[3.0]])
