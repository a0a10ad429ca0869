"""dplr.attention._delta_grad: the delta rule's forward and backward, called directly.

The reference is the recurrence token by token, written here in torch
(float64) in the kernels' layout (..., n, dk)::

    S_t = A_t S_{t-1} + k_t u_t^T,  u_t = beta_t (v_t - k_t^T A_t S_{t-1}),  o_t = S_t^T q_t

with ``A_t = exp(g_t)`` (one decay per row) or ``Diag(exp(g_t))`` (per key
channel); its gradients are torch autograd through that loop.  Bound:
unit-norm keys, beta in (0, 1), n <= 23: every step is a contraction, so
rounding stays O(n dk eps); 1e-10 (float64) and 2e-4 (float32, ~ 1000 n eps)
are far above it and far below any wrong or missing term (O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_err
from dplr._runtime.backend import NumpyOps
from dplr.attention import _delta_grad

torch = pytest.importorskip("torch")

TOL = {np.float32: 2e-4, np.float64: 1e-10}
DECAYS = [None, "row", "channel"]


def _operands(rng, decay, batch=(2,), n=23, dk=4, dv=3, reset=True):
    """q, k, v, beta, g, s0 in the kernels' layout, float64."""
    k = rng.standard_normal((*batch, n, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = 0.5 * rng.standard_normal((*batch, n, dk))
    v = rng.standard_normal((*batch, n, dv))
    beta = rng.uniform(0.1, 0.9, (*batch, n))
    g = None
    if decay is not None:
        g = -rng.uniform(0.0, 0.4, (*batch, n, dk) if decay == "channel" else (*batch, n))
        if reset:
            g[_token(g, q, 9)] = -np.inf  # an exact reset of the state (of every channel)
    s0 = rng.standard_normal((*batch, dk, dv))
    return q, k, v, beta, g, s0


def _token(g, q, t: int) -> tuple:
    """The index of token t in g: (..., n, dk) per channel, (..., n) per row."""
    return (..., t, slice(None)) if g.ndim == q.ndim else (..., t)


def _loop(q, k, v, beta, g, s0):
    """The recurrence (torch); returns o, the final state, u, and the state after every token."""
    state, outs, news, states = s0, [], [], [s0]
    for t in range(q.shape[-2]):
        if g is not None:
            a = g[..., t, :] if g.ndim == q.ndim else g[..., t, None]
            state = a.exp()[..., :, None] * state
        u = beta[..., t, None] * (v[..., t, :] - (k[..., t, :, None] * state).sum(-2))
        state = state + k[..., t, :, None] * u[..., None, :]
        news.append(u)
        outs.append((q[..., t, :, None] * state).sum(-2))
        states.append(state)
    return torch.stack(outs, -2), state, torch.stack(news, -2), states


def _tensors(xs):
    return [None if x is None else torch.tensor(x) for x in xs]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("chunk_size", [1, 5, 32])  # ragged tail; n < c
def test_forward_outputs_new_values_and_chunk_states(dtype, decay, chunk_size):
    rng = np.random.default_rng(0)
    ops_in = _operands(rng, decay)
    o_want, s_want, u_want, every = _loop(*_tensors(ops_in))
    cast = [None if x is None else x.astype(dtype) for x in ops_in]
    o, sn, u, states, _ = _delta_grad.delta_forward(NumpyOps, *cast, chunk_size)
    n = ops_in[0].shape[-2]
    c = min(chunk_size, n)
    boundaries = [*range(0, n, c), n]  # the states entering every chunk, then the last
    tol = TOL[dtype]
    assert o.dtype == dtype and states.shape[-3] == len(boundaries)
    assert rel_err(o, o_want) <= tol and rel_err(sn, s_want) <= tol
    assert rel_err(u, u_want) <= tol
    for j, t in enumerate(boundaries):
        assert rel_err(states[..., j, :, :], every[t]) <= tol, t


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("chunk_size", [4, 32])
@pytest.mark.parametrize("keep_blocks", [False, True])  # blocks formed again / the forward's
def test_backward_is_the_gradient_of_the_recurrence(decay, chunk_size, keep_blocks):
    rng = np.random.default_rng(1)
    q, k, v, beta, g, s0 = ops_in = _operands(rng, decay)
    do = rng.standard_normal(v.shape)
    dsn = rng.standard_normal(s0.shape)
    leaves = [None if x is None else torch.tensor(x, requires_grad=True) for x in ops_in]
    o, sn, _, _ = _loop(*leaves)
    loss = (o * torch.tensor(do)).sum() + (sn * torch.tensor(dsn)).sum()
    present = [x for x in leaves if x is not None]
    want = dict(zip([i for i, x in enumerate(leaves) if x is not None],
                    torch.autograd.grad(loss, present), strict=True))  # fmt: skip
    _, _, u, states, blocks = _delta_grad.delta_forward(NumpyOps, *ops_in, chunk_size, keep_blocks)
    assert (blocks is not None) == keep_blocks
    got = _delta_grad.delta_backward(
        NumpyOps, q, k, v, beta, g, u, states, do, dsn, chunk_size, blocks
    )
    # dq, dk, dv, dbeta, dg, ds0 against the leaves q, k, v, beta, g, s0.
    for i, name in enumerate(("q", "k", "v", "beta", "g", "s0")):
        if name == "g" and g is None:
            assert got[i] is None
            continue
        assert rel_err(got[i], want[i].numpy()) <= TOL[np.float64], name
    if g is not None:
        assert np.all(got[4][_token(g, q, 9)] == 0.0)  # a -inf log decay gets no gradient


def _public(x):
    """Kernels' layout (B, H, T, ...) -> public (B, T, H, ...)."""
    return None if x is None else np.ascontiguousarray(np.swapaxes(x, 1, 2))


@pytest.mark.parametrize("decay", DECAYS)
def test_passes_over_a_long_sequence_match_the_recurrence(decay, monkeypatch):
    # Passes of 2 chunks of 4 tokens (PASS_ROWS = B H 8): 23 tokens in 3 passes.
    rng = np.random.default_rng(2)
    batch = (2, 3)
    ops_in = _operands(rng, decay, batch=batch)
    monkeypatch.setattr(_delta_grad, "PASS_ROWS", 6 * 8)
    assert _delta_grad.pass_length((2, 23, 3, 4), 4) == 8
    leaves = [None if x is None else torch.tensor(x, requires_grad=True) for x in ops_in]
    o_want, s_want, _, _ = _loop(*leaves)
    do = rng.standard_normal(o_want.shape)
    dsn = rng.standard_normal(s_want.shape)
    loss = (o_want * torch.tensor(do)).sum() + (s_want * torch.tensor(dsn)).sum()
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, present))
    want = [None if x is None else next(grads).numpy() for x in leaves]

    q, k, v, beta, g = (_public(x) for x in ops_in[:5])
    s0 = ops_in[5]
    o, sn, saved = _delta_grad.delta_forward_passes(NumpyOps, q, k, v, beta, g, s0, 4)
    assert rel_err(_public(o), o_want.detach().numpy()) <= TOL[np.float64]
    assert rel_err(sn, s_want.detach().numpy()) <= TOL[np.float64]
    got = _delta_grad.delta_backward_passes(NumpyOps, q, k, v, beta, g, saved, _public(do), dsn, 4)
    for name, gr, w in zip(("q", "k", "v", "beta", "g", "s0"), got, want, strict=True):
        if w is None:
            assert gr is None
            continue
        gr = gr if name == "s0" else _public(gr)  # back to the kernels' layout
        assert rel_err(gr, w) <= TOL[np.float64], name


def test_pass_length_is_whole_chunks_and_at_least_one():
    for shape, chunk in [((1, 100, 1, 8), 32), ((4, 50_000, 32, 8), 64), ((1, 7, 1, 8), None)]:
        n = shape[1]
        c = min(chunk or 32, n)
        length = _delta_grad.pass_length(shape, chunk)
        assert length % c == 0 and length >= c
        # Rows per pass (B H tokens) stay within PASS_ROWS unless one chunk is already more.
        assert shape[0] * shape[2] * length <= max(_delta_grad.PASS_ROWS, shape[0] * shape[2] * c)
