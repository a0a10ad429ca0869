"""Matrix families shared by the Cholesky tests (built here, never by dplr)."""

from __future__ import annotations

import numpy as np

#: The documented float64 bound on ``||L' L'^T - B||_F / ||B||_F`` (updates) and
#: ``||L' L'^T - B||_F / ||A||_F`` (downdates) for every method, whatever
#: cond(L): 1e-14 (about 45 eps).  Orthogonal reductions and rotations have a
#: normwise backward error of a small multiple of ``(M + nb) eps`` (Higham,
#: Accuracy and Stability, Thm 19.4 and 19.10; blocked LINPACK downdates are
#: mixed stable, Stewart 1979); measured 2-8 eps at N <= 800.
BOUND64 = 1e-14

#: The float32 counterpart, same multiple of eps: 45 * 1.19e-7.
BOUND32 = 45 * float(np.finfo(np.float32).eps)

NOISES = [1e-2, 1e-6, 1e-8, 1e-10, 1e-12]


def rbf(n: int, noise: float) -> np.ndarray:
    """RBF kernel, length scale 0.5, on n points of [0, 10], plus noise * I."""
    x = np.linspace(0.0, 10.0, n)
    return np.exp(-0.5 * ((x[:, None] - x[None, :]) / 0.5) ** 2) + noise * np.eye(n)


def backward_error(new: np.ndarray, b: np.ndarray, ref_norm: np.ndarray | None = None, lower=True):
    """``||L' L'^T - B||_F / ||ref||_F`` per batch entry, in float64."""
    low = np.asarray(new, dtype=np.float64)
    low = low if lower else np.swapaxes(low, -1, -2)
    err = np.linalg.norm(low @ np.swapaxes(low, -1, -2) - b, axis=(-2, -1))
    return err / (np.linalg.norm(b, axis=(-2, -1)) if ref_norm is None else ref_norm)


def assert_factor_shape(new: np.ndarray, lower: bool = True) -> None:
    """Zeros in the other triangle, positive finite diagonal."""
    low = new if lower else np.swapaxes(new, -1, -2)
    assert np.all(np.triu(low, 1) == 0)
    d = np.diagonal(low, 0, -2, -1)
    assert np.all(np.isfinite(d)) and np.all(d > 0)
