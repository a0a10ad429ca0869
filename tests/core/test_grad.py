"""dplr.core._grad: the hand-written gradients, called directly with NumPy operands.

The references are torch autograd (float64) through the dense definitions,
written here: ``T = diag(lam) + tril(Q K^T ⊙ D, -1)`` with ``D_ij =
exp(G_i - G_j)`` (per row) or ``T_ij = sum_c q_ic k_jc exp(G_ic - G_jc)``
(per channel), ``Y = T V + (Q ⊙ exp(G)) h0`` and its solve
``Y = T^-1 (V - (Q ⊙ exp(G)) h0)`` with the final state
``h_n = exp(G_n) h0 + sum_j exp(G_n - G_j) k_j y_j^T``.  Bound: float64,
n <= 11, cond(T) <= ~10: every gradient is a few products and solves, so
1e-10 relative is far above rounding (~1e-14) and far below any wrong or
missing term (O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_err
from dplr._runtime.backend import NumpyOps
from dplr.core import _grad

torch = pytest.importorskip("torch")

TOL = 1e-10


def test_reverse_cumsum_is_the_sum_of_the_tail():
    x = np.random.default_rng(0).standard_normal((3, 6, 2))
    got = _grad.reverse_cumsum(NumpyOps, x, axis=1)
    want = np.stack([x[:, s:].sum(1) for s in range(6)], 1)
    assert rel_err(got, want) <= 1e-14


def test_log_decay_grad_sums_the_tail_and_is_zero_at_resets():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, 3))
    log_decay = -rng.uniform(0, 1, 5)
    log_decay[2] = -np.inf
    dg = rng.standard_normal(5)
    got = _grad.log_decay_grad(NumpyOps, q, log_decay, dg)
    want = np.array([dg[s:].sum() for s in range(5)])
    want[2] = 0.0  # G is constant in a -inf entry: no gradient flows into it
    assert rel_err(got, want) <= 1e-14


def _operands(rng, per_channel: bool, batch=(2,), n=11, d=3, m=4):
    q, k = (0.3 * rng.standard_normal((*batch, n, d)) for _ in range(2))
    lam = rng.uniform(1.0, 2.0, (*batch, n))
    log_decay = -rng.uniform(0.0, 0.5, (*batch, n, d) if per_channel else (*batch, n))
    v = rng.standard_normal((*batch, n, m))
    h0 = rng.standard_normal((*batch, d, m))
    return q, k, lam, log_decay, v, h0


def _window_sums(q, log_decay):
    """``W[i, j] = sum_{j <= t < i} log_decay_t`` for 0 <= j <= i <= n: (..., n+1, n+1, e).

    Summed entry by entry (never ``G_i - G_j``), so a ``-inf`` log decay gives
    exact zeros and zero gradients instead of ``inf - inf``.
    """
    ld = log_decay if log_decay.ndim == q.ndim else log_decay[..., None]
    n = ld.shape[-2]
    t = torch.arange(n)
    ends = torch.arange(n + 1)
    inside = (ends[None, :, None] <= t) & (t < ends[:, None, None])  # [i, j, t]: j <= t < i
    return torch.where(inside[..., None], ld[..., None, None, :, :], 0.0).sum(-2)


def _dense_t(q, k, lam, log_decay):
    """T from the definition, in torch (differentiable in every operand)."""
    n = q.shape[-2]
    below = torch.ones(n, n, dtype=torch.bool).tril(-1)
    decay = _window_sums(q, log_decay)[..., 1:, 1:, :].exp()  # D_ij = exp(sum_{j < t <= i})
    if log_decay.ndim == q.ndim:  # per channel: sum_c q_ic k_jc D_ijc
        low = (q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
    else:
        low = (q @ k.mT) * decay[..., 0]
    return torch.where(below, low, 0.0) + torch.diag_embed(lam)


def _weights(q, log_decay):
    """exp(G) and exp(G_n - G) as row factors (..., n, 1) or per channel (..., n, d)."""
    w = _window_sums(q, log_decay)
    return w[..., 1:, 0, :].exp(), w[..., -1, 1:, :].exp()


def _torch_grads(fn, operands, cotangents):
    """Autograd gradients of ``sum <cotangent, fn(*operands)>`` for every operand."""
    leaves = [torch.tensor(x, requires_grad=True) for x in operands]
    outs = fn(*leaves)
    loss = sum((o * torch.tensor(c)).sum() for o, c in zip(outs, cotangents, strict=True))
    return [g.numpy() for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 32])  # several chunks with a ragged tail; one chunk
def test_matmul_backward_is_the_gradient_of_the_dense_product(per_channel, chunk_size):
    rng = np.random.default_rng(2)
    q, k, lam, log_decay, v, h0 = operands = _operands(rng, per_channel)
    dy = rng.standard_normal(v.shape)

    def product(q, k, lam, log_decay, v, h0):
        e_g, _ = _weights(q, log_decay)
        return (_dense_t(q, k, lam, log_decay) @ v + (q * e_g) @ h0,)

    want = _torch_grads(product, operands, [dy])
    got = _grad.matmul_backward(NumpyOps, q, k, lam, log_decay, v, h0, dy,
                                transpose=False, chunk_size=chunk_size)  # fmt: skip
    for name, g, w in zip(("q", "k", "lam", "log_decay", "v", "h0"), got, want, strict=True):
        assert rel_err(g, w) <= TOL, name


@pytest.mark.parametrize("per_channel", [False, True])
def test_transposed_matmul_backward_without_state(per_channel):
    rng = np.random.default_rng(3)
    q, k, lam, log_decay, v, _ = _operands(rng, per_channel)
    dy = rng.standard_normal(v.shape)

    def product(q, k, lam, log_decay, v):
        return (_dense_t(q, k, lam, log_decay).mT @ v,)

    want = _torch_grads(product, (q, k, lam, log_decay, v), [dy])
    got = _grad.matmul_backward(NumpyOps, q, k, lam, log_decay, v, None, dy,
                                transpose=True, chunk_size=4)  # fmt: skip
    assert got[5] is None
    for name, g, w in zip(("q", "k", "lam", "log_decay", "v"), got[:5], want, strict=True):
        assert rel_err(g, w) <= TOL, name


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 32])
def test_solve_backward_is_the_gradient_of_the_solve_and_final_state(per_channel, chunk_size):
    rng = np.random.default_rng(4)
    q, k, lam, log_decay, v, h0 = operands = _operands(rng, per_channel)
    log_decay[:, 5] = -np.inf  # an exact reset: no gradient into that entry
    dy, dhn = rng.standard_normal(v.shape), rng.standard_normal(h0.shape)

    def solve(q, k, lam, log_decay, v, h0):
        e_g, e_tail = _weights(q, log_decay)
        t = _dense_t(q, k, lam, log_decay)
        y = torch.linalg.solve_triangular(t, v - (q * e_g) @ h0, upper=False)
        hn = e_g[..., -1, :, None] * h0 + (k * e_tail).mT @ y
        return y, hn

    want = _torch_grads(solve, operands, [dy, dhn])
    y = solve(*(torch.tensor(x) for x in operands))[0].numpy()
    got = _grad.solve_backward(NumpyOps, q, k, lam, log_decay, y, h0, dy, dhn,
                               transpose=False, chunk_size=chunk_size)  # fmt: skip
    for name, g, w in zip(("q", "k", "lam", "log_decay", "v", "h0"), got, want, strict=True):
        assert rel_err(g, w) <= TOL, name
    assert np.all(got[3][:, 5] == 0.0)


def test_first_order_only_gives_gradients_and_refuses_second_derivatives():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @_grad.first_order_only("the square")
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            return (2 * x * dy,)

    x = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(Square.apply(x).sum(), x)
    assert torch.equal(g, 2 * x.detach())
    (g,) = torch.autograd.grad(Square.apply(x).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), 2 * x.detach())
    with pytest.raises(NotImplementedError, match="second derivatives of the square"):
        torch.autograd.grad(g.sum(), x)
