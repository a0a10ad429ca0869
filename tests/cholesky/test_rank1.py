"""dplr.cholesky._rank1: the compiled rotation sweeps and triangle helpers, called directly.

References are built here: ``numpy.linalg.cholesky`` of ``L L^T +- x x^T``
formed densely, and ``numpy.tril``.  Bound: a rank-1 modification by
rotations is backward stable (Stewart 1979; Higham, Accuracy and Stability,
19.10), so on factors with cond(L) <= 10 the factor itself is within
``50 n eps`` of the reference (forward error <= cond x backward error).
"""

from __future__ import annotations

import numpy as np
import pytest
from chol_families import BOUND32, BOUND64, backward_error

from dplr.cholesky import _rank1
from dplr.cholesky._rank1 import SMALL


def _factors(rng, batch: int, n: int) -> np.ndarray:
    """Lower factors of ``X X^T / n + I`` (cond(L) <= ~3)."""
    x = rng.standard_normal((batch, n, n))
    return np.linalg.cholesky(x @ np.swapaxes(x, -1, -2) / n + np.eye(n))


def _sweep(src, x, down, rows, inplace=False, src_idx=None):
    """Call :func:`_rank1.sweep` on lower factors ``src`` in the chosen memory order."""
    count, n = x.shape
    stored = src if rows else np.ascontiguousarray(np.swapaxes(src, -1, -2))  # R = L^T, C order
    dst = stored if inplace else np.full((count, n, n), np.nan, dtype=src.dtype)
    idx = np.arange(count) if src_idx is None else src_idx
    ok = np.empty(count, dtype=bool)
    fin, pos = _rank1.sweep(stored, idx, dst, x.copy(), np.asarray(down), ok, inplace, rows)
    lower = dst if rows else np.swapaxes(dst, -1, -2)
    return lower, ok, fin, pos


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("n", [1, 5, SMALL, SMALL + 11])  # the small-order path and the grouped one
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_matches_the_factor_of_the_modified_matrix(rows, n, dtype):
    rng = np.random.default_rng(0)
    L = _factors(rng, 3, n)
    x = rng.standard_normal((3, n))
    new, ok, fin, pos = _sweep(L.astype(dtype), x.astype(dtype), [False] * 3, rows)
    assert ok.all() and fin.all() and pos.all()
    want = np.linalg.cholesky(L @ np.swapaxes(L, -1, -2) + x[:, :, None] * x[:, None, :])
    assert np.all(np.triu(new, 1) == 0)  # the other triangle is written with zeros
    tol = 50 * n * np.finfo(dtype).eps
    assert np.abs(new - want).max() <= tol * np.abs(want).max()


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_downdate_is_the_factor_of_the_difference_and_flags_indefinite(rows, inplace):
    rng = np.random.default_rng(1)
    n = 40
    L = _factors(rng, 2, n)
    p = rng.standard_normal((2, n))
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    p[0] *= 0.6  # ||L^-1 x|| = 0.6 < 1: positive definite; 1.5: not
    p[1] *= 1.5
    x = np.einsum("bij,bj->bi", L, p)
    before = L.copy()
    new, ok, fin, pos = _sweep(L, x, [True, True], rows, inplace)
    assert list(ok) == [True, False] and pos.all() and fin[0]
    want = np.linalg.cholesky(before[0] @ before[0].T - np.outer(x[0], x[0]))
    # cond(L L^T - x x^T) <= cond(L L^T) / (1 - 0.6^2): still a small factor.
    assert np.abs(new[0] - want).max() <= 200 * n * np.finfo(float).eps
    # A failed entry is not written in place, and gets a copy of the input otherwise.
    assert np.array_equal(new[1], before[1])


def test_broadcast_source_and_non_positive_diagonal_is_skipped():
    rng = np.random.default_rng(2)
    n = 9
    L = _factors(rng, 2, n)
    L[1, 4, 4] = -1.0  # not a Cholesky factor
    x = rng.standard_normal((4, n))
    idx = np.array([0, 1, 0, 1])  # four outputs read two inputs (no copies)
    new, ok, _, pos = _sweep(L, x, [False] * 4, True, src_idx=idx)
    assert list(pos) == [True, False, True, False] and list(ok) == [True, False, True, False]
    for b in (0, 2):
        want = np.linalg.cholesky(L[0] @ L[0].T + np.outer(x[b], x[b]))
        assert np.abs(new[b] - want).max() <= 50 * n * np.finfo(float).eps


@pytest.mark.parametrize("dtype, bound", [(np.float32, BOUND32), (np.float64, BOUND64)])
def test_many_updates_and_downdates_stay_backward_stable(dtype, bound):
    # M sweeps, alternately up and down, through the threaded batch split (B > 64).
    rng = np.random.default_rng(3)
    n, count = 12, 130
    L = _factors(rng, count, n)
    a = L @ np.swapaxes(L, -1, -2)
    cur = L.astype(dtype)
    for _ in range(2):  # each downdate removes the update before it: always definite
        x = (0.5 * rng.standard_normal((count, n))).astype(dtype)
        for down in (False, True):
            cur, ok, _, _ = _sweep(cur, x, [down] * count, True)
            assert ok.all()
    # Back to A: backward error ||L' L'^T - A|| / ||A||, the documented bound of every method.
    assert backward_error(cur, a).max() <= bound


def test_tri_all_finite_reads_only_the_triangle():
    rng = np.random.default_rng(4)
    L = _factors(rng, 4, 6)
    L[:, 0, 5] = np.nan  # above the diagonal: never read for a lower factor
    L[2, 3, 1] = np.inf
    assert list(_rank1.tri_all_finite(L, True)) == [True, True, False, True]
    R = np.ascontiguousarray(np.swapaxes(L, -1, -2))  # upper: the NaN is now below
    assert list(_rank1.tri_all_finite(R, False)) == [True, True, False, True]


@pytest.mark.parametrize("rows", [True, False])
def test_copy_tri_and_negate_lower_against_numpy(rows):
    rng = np.random.default_rng(5)
    src = rng.standard_normal((7, 7))
    dst = np.full((7, 7), np.nan)
    _rank1.copy_tri(src, dst, rows)  # the lower triangle, or the upper one of R = L^T
    assert np.array_equal(dst, np.tril(src) if rows else np.triu(src))
    out = np.full((7, 7), np.nan)
    _rank1.negate_lower(out, src)
    assert np.array_equal(out, -np.tril(src))
    _rank1.negate_lower(src, src)  # in place
    assert np.array_equal(src, out)
