"""LAPACK's triangular-pentagonal QR called on sub-blocks in place, against SciPy's own wrapper."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import lapack as scipy_lapack

from dplr._runtime import lapack


def _pair(rng, n: int, m: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    r = np.triu(rng.standard_normal((n, n))) + 4.0 * np.eye(n)
    return np.asfortranarray(r, dtype=dtype), np.asfortranarray(rng.standard_normal((m, n)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "m", "panel"), [(1, 1, 1), (7, 3, 7), (40, 5, 16), (50, 9, 13)])
def test_panels_reproduce_one_call(dtype, n, m, panel):
    """Panels of ?tpqrt, each followed by ?tpmqrt on the columns to its right, give the
    same R as one SciPy ?tpqrt over all columns (the same reflectors in the same order:
    equal up to rounding, bound 50 n eps ||R||), and ``R'^T R' = R^T R + B^T B``."""
    rng = np.random.default_rng(n * 100 + m)
    r, b = _pair(rng, n, m, dtype)
    gram = r.T.astype(np.float64) @ r + b.T.astype(np.float64) @ b
    nb = min(4, panel)
    fn = scipy_lapack.dtpqrt if dtype == np.float64 else scipy_lapack.stpqrt
    expected = np.triu(fn(0, min(nb, n), r, b)[0])
    for start in range(0, n, panel):
        stop = min(start + panel, n)
        t = np.empty((min(nb, stop - start), stop - start), dtype, order="F")
        lapack.tpqrt(r, b, start, stop, t)
        if stop < n:
            lapack.tpmqrt_transposed(b[:, start:stop], t, r, b, slice(start, stop), slice(stop, n))
    eps = np.finfo(dtype).eps
    scale = np.linalg.norm(expected)
    assert np.linalg.norm(np.triu(r) - expected) <= 50 * n * eps * scale
    assert np.linalg.norm(np.triu(r).T @ np.triu(r) - gram) <= 50 * n * eps * np.linalg.norm(gram)


def test_column_split_is_the_same_application():
    """Applying Q^T to two column ranges separately equals applying it to both at once."""
    rng = np.random.default_rng(3)
    r, b = _pair(rng, 30, 4, np.float64)
    t = np.empty((4, 10), order="F")
    lapack.tpqrt(r, b, 0, 10, t)
    r2, b2 = r.copy(order="F"), b.copy(order="F")
    lapack.tpmqrt_transposed(b[:, :10], t, r, b, slice(0, 10), slice(10, 30))
    lapack.tpmqrt_transposed(b2[:, :10], t, r2, b2, slice(0, 10), slice(10, 17))
    lapack.tpmqrt_transposed(b2[:, :10], t, r2, b2, slice(0, 10), slice(17, 30))
    np.testing.assert_allclose(r2, r, rtol=0, atol=1e-13)
    np.testing.assert_allclose(b2, b, rtol=0, atol=1e-13)


def test_rejects_row_major_and_other_dtypes():
    r, b = _pair(np.random.default_rng(0), 5, 2, np.float64)
    t = np.empty((2, 5), order="F")
    with pytest.raises(ValueError, match="column-major"):
        lapack.tpqrt(np.ascontiguousarray(r), b, 0, 5, t)
    with pytest.raises(TypeError, match="float32 or float64"):
        lapack.tpqrt(r.astype(np.complex128), b, 0, 5, t)
