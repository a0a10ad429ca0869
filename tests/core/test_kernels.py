"""Pieces of dplr.core._kernels used by backward passes, against direct computations.

- ``solve_blocks_transposed`` against SciPy's triangular solve with ``L^T``.
- ``state_pass_adjoint`` against torch autograd through the forward chunk
  recurrence written out as a loop here.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from conftest import eps, rel_err
from dplr._runtime.backend import NumpyOps, TorchOps
from dplr.core import _kernels

try:
    import torch
except ImportError:  # torch is optional: the torch test needs it
    torch = None


def _torch_loops_off_the_cpu(monkeypatch) -> None:
    """Make TorchOps take its path for tensors off the CPU (torch loops, no compiled code)."""
    from dplr._runtime import backend

    monkeypatch.setattr(backend, "_all_cpu", lambda *xs: False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lib", ["numpy", "torch", "torch off the CPU"])
def test_solve_blocks_transposed_is_the_transposed_solve(dtype, lib, monkeypatch):
    if lib != "numpy" and torch is None:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(0)
    c, r = 7, 3
    blocks = np.tril(rng.standard_normal((2, 3, c, c)), -1) * 0.3 + np.eye(c)
    blocks += np.triu(rng.standard_normal((c, c)), 1)  # never read: above the diagonal
    rhs = rng.standard_normal((2, 3, c, r))
    ops, args = NumpyOps, (blocks.astype(dtype), rhs.astype(dtype))
    if lib != "numpy":
        ops, args = TorchOps, tuple(torch.tensor(x) for x in args)
        if lib == "torch off the CPU":
            _torch_loops_off_the_cpu(monkeypatch)
    got = np.asarray(_kernels.solve_blocks_transposed(ops, *args))
    for idx in np.ndindex(2, 3):
        want = sl.solve_triangular(np.tril(blocks[idx]).T, rhs[idx], lower=False)
        # Unit diagonal, off-diagonal entries <= 1: a c x c solve loses ~c eps.
        assert rel_err(got[idx], want) < 10 * c * eps(dtype)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reset", [False, True])  # a chunk whose decay is exactly 0
@pytest.mark.parametrize("compiled", [True, False])  # False: the loop for tensors off the CPU
def test_state_pass_adjoint_is_the_gradient_of_the_recurrence(
    per_channel, reset, compiled, monkeypatch
):
    """``Y_J = Ỹ_J - W_J Z_J``, ``Z_{J+1} = Diag(a_J) Z_J + k_out_J^T Y_J``, read as
    ``x_read_J Z_J``: its reverse pass."""
    rng = np.random.default_rng(1)
    n, c, d, m = 13, 4, 3, 2
    k = torch.tensor(rng.standard_normal((2, n, d)))
    g = -rng.uniform(0.0, 1.0, (2, n, d) if per_channel else (2, n))
    if reset:
        g[:, 5] = -np.inf
    ch = _kernels.make_chunked(TorchOps, k, k, k[..., 0] * 0 + 1, torch.tensor(g), c)
    nc = ch.nc
    w = torch.tensor(rng.standard_normal((2, nc, c, d)))
    y_tilde = torch.tensor(rng.standard_normal((2, nc, c, m)), requires_grad=True)
    z0 = torch.tensor(rng.standard_normal((2, d, m)), requires_grad=True)
    dy_direct = torch.tensor(rng.standard_normal((2, nc, c, m)))
    x_read = torch.tensor(rng.standard_normal((2, nc, c, d)))
    dy_read = torch.tensor(rng.standard_normal((2, nc, c, m)))
    dz_last = torch.tensor(rng.standard_normal((2, d, m)))

    z, loss, states_out = z0, 0.0, []
    for j in range(nc):
        loss = loss + ((x_read[:, j] @ z) * dy_read[:, j]).sum()  # the states are read
        y = y_tilde[:, j] - w[:, j] @ z
        loss = loss + (y * dy_direct[:, j]).sum()
        a = ch.chunk_decay[:, j]
        z = (a[..., None] if per_channel else a[:, None, None]) * z + ch.k_out[:, j].mT @ y
        z.retain_grad()
        states_out.append(z)
    loss = loss + (z * dz_last).sum()
    loss.backward()

    if reset:
        assert (ch.chunk_decay[:, 1] == 0).all()
    if not compiled:
        _torch_loops_off_the_cpu(monkeypatch)
    dy, dz_next, dz0 = _kernels.state_pass_adjoint(
        TorchOps, ch, w, dy_direct, x_read, dy_read, dz_last
    )
    tol = 100 * eps(np.float64)
    assert rel_err(dy, y_tilde.grad) < tol  # dL/dỸ_J is the total gradient of Y_J
    assert rel_err(dz0, z0.grad) < tol
    for j in range(nc):  # the gradient of the state leaving chunk j, all its uses
        assert rel_err(dz_next[:, j], states_out[j].grad) < tol
