"""The row-by-row path of the core product and solve (d <= 8), against dense references.

The other core tests force the chunked kernels (tests/conftest.py); here the
default choice runs, and the same operations are checked against the dense
matrix built from the definition (tests/core/test_tril_channel.py) with the
same bounds: ``(n + d) eps |T||V|`` for products, ``(n + d) eps cond(T)``
relative for solves.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
from test_tril_channel import dense_reference, operands

import dplr
from conftest import eps, rel_err
from dplr.core import _rowwise


def decays(rng, kind, shape_row, d):
    if kind == "none":
        return None
    shape = (*shape_row, d) if kind.startswith("channel") else shape_row
    ld = -rng.uniform(0.0, 2.0, shape)
    if kind.endswith("resets"):
        ld[rng.random(shape) < 0.1] = -np.inf
    return ld


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "row", "row-resets", "channel", "channel-resets"])
@pytest.mark.parametrize(("batch", "n", "d"), [((), 1, 1), ((2,), 50, 4), ((), 37, 8)])
def test_against_dense(rng, batch, n, d, kind, dtype):
    q, k, diag = operands(rng, batch, n, d, dtype)
    ld = decays(rng, kind, (*batch, n), d)
    ld = None if ld is None else ld.astype(dtype)
    v = rng.standard_normal((*batch, n, 3)).astype(dtype)
    assert _rowwise.applies(q, v)
    T = dplr.LowRankTril(q, k, diag, ld)
    dense = dense_reference(q, k, diag, np.zeros((*batch, n)) if ld is None else ld)
    absT = np.abs(dense_reference(np.abs(q), np.abs(k), np.abs(diag), 0.0 * dense[..., 0]))
    cond = np.linalg.cond(dense.reshape(-1, n, n), p=np.inf).max()
    for tr in (False, True):
        A = dense.swapaxes(-1, -2) if tr else dense
        y = T.matmul(v, transpose=tr)
        scale = ((absT.swapaxes(-1, -2) if tr else absT) @ np.abs(v.astype(float))).max()
        assert y.dtype == dtype
        assert np.abs(y - A @ v.astype(float)).max() <= 2 * (n + d) * eps(dtype) * scale
        x = T.solve(v, transpose=tr)
        ref = np.stack(
            [sl.solve_triangular(a, b, lower=not tr) for a, b in zip(
                A.reshape(-1, n, n), v.astype(float).reshape(-1, n, 3), strict=True
            )]
        ).reshape(x.shape)  # fmt: skip
        assert rel_err(x, ref) <= 4 * (n + d) * eps(dtype) * cond


def test_long_sequence_small_rank():
    """n = 200000, d = 4, m = 1, decay 0.1 per row: head and tail against dense solves."""
    rng = np.random.default_rng(9)
    n, d = 200_000, 4
    k = rng.standard_normal((n, d))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    q = rng.uniform(0.0, 1.0, (n, 1)) * k
    ld = np.full(n, -0.1)
    v = rng.standard_normal(n)
    x = dplr.tril_solve(q, k, v, log_decay=ld)
    m = 800
    head = dense_reference(q[:m], k[:m], None, ld[:m])
    np.testing.assert_allclose(x[:m], sl.solve_triangular(head, v[:m], lower=True), rtol=1e-12)
    # row i of T x = v, from row i - m on (the decay makes older rows vanish below 1e-30)
    i = n - 1
    lo = i - 700
    coupling = (q[i] * k[lo:i]).sum(1) * np.exp(-0.1 * np.arange(i - lo, 0, -1))
    assert abs(x[i] + coupling @ x[lo:i] - v[i]) < 1e-12


def test_torch_gradients_against_dense_autograd():
    torch = pytest.importorskip("torch")
    from test_tril_channel_torch import dense_torch, make

    for mode in ("mild", "resets", "scalar-resets"):
        q, k, diag, ld, v = make(11, (2,), 17, 3, 2, mode)
        leaves = [x.requires_grad_() for x in (q, k, diag, ld, v)]
        assert _rowwise.applies(q, v)
        T = dplr.LowRankTril(q, k, diag, ld)
        outs = [T.solve(v), T.solve(v, transpose=True), T.matmul(v), T.matmul(v, transpose=True)]
        A = dense_torch(q, k, diag, ld)
        refs = [
            torch.linalg.solve_triangular(A, v, upper=False),
            torch.linalg.solve_triangular(A.mT, v, upper=True),
            A @ v,
            A.mT @ v,
        ]
        for out, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        w = [torch.randn(o.shape, dtype=o.dtype) for o in outs]
        got = torch.autograd.grad(sum((o * x).sum() for o, x in zip(outs, w, strict=True)), leaves)
        want = torch.autograd.grad(sum((o * x).sum() for o, x in zip(refs, w, strict=True)), leaves)
        for g_got, g_want in zip(got, want, strict=True):
            torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)
