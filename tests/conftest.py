"""Shared test helpers: random structured matrices and dtype-aware tolerances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so that a run of the suite is
# reproducible; new draws come from changing the seed here, not from chance in CI.
settings.register_profile("dplr", derandomize=True, database=None)
settings.load_profile("dplr")

try:
    import torch
except ImportError:  # the torch extra is optional; torch tests import it themselves
    torch = None


def eps(dtype) -> float:
    """Machine epsilon of a NumPy or torch floating dtype."""
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def rel_err(actual, expected) -> float:
    """Max-norm relative error ``max|a - e| / max|e|`` (0 when both are zero)."""
    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, np.float64)
    e = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, np.float64)
    scale = np.abs(e).max(initial=0.0)
    diff = np.abs(a - e).max(initial=0.0)
    return diff / scale if scale > 0 else diff


def delta_family(rng, shape, n, d, dtype=np.float64, decay=False):
    """Well-conditioned operands: unit-norm rows of k, q = beta k, beta in (0, 1).

    T = I + tril(q k^T ⊙ D, -1) is then a product of contractions' inverses
    (the delta-rule family), so cond(T) stays modest for any n.
    """
    k = rng.standard_normal((*shape, n, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0.0, 1.0, (*shape, n))
    q = beta[..., None] * k
    log_decay = -rng.uniform(0.0, 0.2, (*shape, n)) if decay else None
    return q.astype(dtype), k.astype(dtype), None if log_decay is None else log_decay.astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def chunked_core_for_small_d(request, monkeypatch):
    """Core tests run the chunked kernels even for d <= 8 (most use small d),
    except those of the row-by-row path itself (tests/core/test_rowwise.py)."""
    where = str(request.node.path)
    if "tests/core/" in where.replace("\\", "/") and "test_rowwise" not in where:
        from dplr._runtime import tuning

        monkeypatch.setattr(tuning, "RECURRENT_MAX_RANK", 0)


@pytest.fixture(params=["compiled", "device"])
def path(request, monkeypatch):
    """Run a torch test on the compiled CPU loops or on the pure-torch loops.

    "device" forces the branch that tensors on other devices (CUDA) take,
    on CPU tensors, by making the backend believe they are elsewhere.
    """
    if request.param == "device":
        from dplr._runtime import backend as _backend

        monkeypatch.setattr(_backend, "_all_cpu", lambda *xs: False)
    return request.param
