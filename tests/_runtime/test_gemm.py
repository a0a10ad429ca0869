"""BLAS's gemm called from compiled loops, against NumPy's product in float64.

Tolerance: each entry is a sum of k rounded products, so its error is at most
about ``k eps`` times the sum of the magnitudes of its terms (Higham, Accuracy
and Stability of Numerical Algorithms, 3.5); ``4 k eps`` of the product of the
absolute values bounds it.  A wrong transpose, leading dimension or scalar is
O(1) off.
"""

from __future__ import annotations

import numpy as np
import pytest

from dplr._runtime.gemm import gemm, gemm_both, gemm_scratch
from dplr._runtime.jit import jit


@jit(nogil=True)
def _call(a, b, c, alpha, beta, transpose_a):
    gemm(a, b, c, alpha, beta, transpose_a, gemm_scratch(c.dtype))


def _expected(a, b, c0, alpha, beta, transpose_a):
    a64, b64 = (np.asarray(x, np.float64) for x in (a, b))
    op = a64.T if transpose_a else a64
    return alpha * (op @ b64) + beta * np.asarray(c0, np.float64), np.abs(op) @ np.abs(b64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (5, 3, 7), (33, 17, 64), (4, 6, 0)])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (-1.0, 1.0), (0.5, 0.25)])
def test_matches_numpy_on_strided_rows(dtype, transpose_a, m, n, k, alpha, beta):
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    # Operands are column slices of wider arrays: rows contiguous, row stride larger.
    a_shape = (k, m) if transpose_a else (m, k)
    a = rng.standard_normal((a_shape[0], a_shape[1] + 3)).astype(dtype)[:, 1 : 1 + a_shape[1]]
    b = rng.standard_normal((k, n + 5)).astype(dtype)[:, 2 : 2 + n]
    wide = rng.standard_normal((m, n + 4)).astype(dtype)
    c = wide[:, :n]
    c0, right = c.copy(), wide[:, n:].copy()
    if beta == 0.0:
        c[:] = np.nan  # beta = 0: c is only written, never read
    _call(a, b, c, alpha, beta, transpose_a)
    want, scale = _expected(a, b, c0, alpha, beta, transpose_a)
    eps = np.finfo(dtype).eps
    terms = abs(alpha) * scale + abs(beta) * np.abs(c0)
    tol = 4 * max(k, 1) * eps * terms + 4 * eps * np.abs(want)
    assert np.all(np.abs(c - want) <= tol)
    np.testing.assert_array_equal(wide[:, n:], right)  # nothing written beyond the block


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_output_writes_nothing(dtype):
    a, b = np.ones((0, 4), dtype), np.ones((4, 3), dtype)
    c = np.empty((0, 3), dtype)
    _call(a, b, c, 1.0, 0.0, False)  # returns without calling BLAS
    assert c.shape == (0, 3)


@jit(nogil=True)
def _call_both(a, b, c, alpha, beta, transpose_a, transpose_b):
    gemm_both(a, b, c, alpha, beta, transpose_a, transpose_b, gemm_scratch(c.dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (5, 3, 7), (33, 17, 64), (4, 6, 0)])
def test_both_transposes_match_numpy_on_strided_rows(dtype, transpose_a, transpose_b, m, n, k):
    rng = np.random.default_rng(m * 100 + n * 10 + k + 7)
    a_shape = (k, m) if transpose_a else (m, k)
    b_shape = (n, k) if transpose_b else (k, n)
    a = rng.standard_normal((a_shape[0], a_shape[1] + 3)).astype(dtype)[:, 1 : 1 + a_shape[1]]
    b = rng.standard_normal((b_shape[0], b_shape[1] + 5)).astype(dtype)[:, 2 : 2 + b_shape[1]]
    wide = rng.standard_normal((m, n + 4)).astype(dtype)
    c = wide[:, :n]
    c0, right = c.copy(), wide[:, n:].copy()
    _call_both(a, b, c, -0.5, 0.25, transpose_a, transpose_b)
    a64, b64 = (np.asarray(x, np.float64) for x in (a, b))
    op_a, op_b = (a64.T if transpose_a else a64), (b64.T if transpose_b else b64)
    want = -0.5 * (op_a @ op_b) + 0.25 * np.asarray(c0, np.float64)
    eps = np.finfo(dtype).eps
    terms = 0.5 * (np.abs(op_a) @ np.abs(op_b)) + 0.25 * np.abs(c0)
    tol = 4 * max(k, 1) * eps * terms + 4 * eps * np.abs(want)
    assert np.all(np.abs(c - want) <= tol)
    np.testing.assert_array_equal(wide[:, n:], right)
