"""dplr.reference against computations built here, independently of it.

- ``tril_dense`` against the definition entry by entry (a double loop).
- The delta-rule recurrences against the closed form of their outputs: with
  ``S_0 = 0`` the state is ``S_t = sum_{j<=t} D_tj k_j u_j^T`` where the
  written values ``U`` solve ``(I + tril(diag(beta) K K^T ⊙ D, -1)) U =
  diag(beta) V``, so ``O = scale (Q K^T ⊙ D, lower with diagonal) U``: one
  dense triangular solve (SciPy) on matrices built by the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import eps, rel_err
from dplr.reference import (
    delta_rule_recurrent,
    gated_delta_rule_recurrent,
    kda_recurrent,
    tril_dense,
)

try:
    import torch
except ImportError:  # torch is optional: the torch tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def entry_by_entry(q, k, lam, log_decay):
    """T from its definition, one entry at a time, for one matrix."""
    n = q.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        out[i, i] = 1.0 if lam is None else lam[i]
        for j in range(i):
            decay = 1.0 if log_decay is None else np.exp(np.sum(log_decay[j + 1 : i + 1]))
            out[i, j] = (q[i] @ k[j]) * decay
    return out


def closed_form(q, k, v, beta, g, scale, magnitude=False):
    """Outputs of the (gated) delta rule from S_0 = 0 by one dense triangular solve per head.

    With ``magnitude=True`` it returns ``scale |tril(Q K^T ⊙ D)| |U|`` instead: the
    size of the terms that each output sums, the scale of its rounding errors
    (an output much smaller than its terms is known only to that scale).
    """
    B, T, H, _ = q.shape
    out = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            qh, kh, vh, bh = q[b, :, h], k[b, :, h], v[b, :, h], beta[b, :, h]
            cum = np.zeros(T) if g is None else np.cumsum(g[b, :, h])
            decay = np.tril(np.exp(np.tril(cum[:, None] - cum[None, :])))
            system = np.eye(T) + np.tril(bh[:, None] * (kh @ kh.T) * decay, -1)
            u = sl.solve_triangular(system, bh[:, None] * vh, lower=True)
            mix = np.tril(qh @ kh.T * decay)
            out[b, :, h] = scale * (np.abs(mix) @ np.abs(u) if magnitude else mix @ u)
    return out


def inputs(rng, B, T, H, K, V, dtype=np.float64, strong=False):
    """The contracting family: unit-norm keys, beta in (0, 1), decays in (0, 1]."""
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V))
    beta = rng.uniform(0.0, 1.0, (B, T, H))
    g = -rng.uniform(0.0, 3.0 if strong else 0.3, (B, T, H))
    return [x.astype(dtype) for x in (q, k, v, beta, g)]


def tolerance(dtype, T, K, V):
    """Each step rounds ~(K + V) products; the steps are contractions, so the
    errors add up over the T steps without growing: 10 (K + V) T eps."""
    return 10 * (K + V) * max(T, 1) * eps(dtype)


# ---------------------------------------------------------------------- tril_dense
@pytest.mark.parametrize("with_lam", [False, True])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_tril_dense_is_the_definition(n, with_lam, with_decay):
    rng = np.random.default_rng(n)
    q, k = rng.standard_normal((2, n, 3)), rng.standard_normal((2, n, 3))
    lam = rng.uniform(0.5, 2.0, (2, n)) if with_lam else None
    ld = -rng.uniform(0.0, 2.0, (2, n)) if with_decay else None
    got = tril_dense(q, k, lam, ld)
    for b in range(2):
        want = entry_by_entry(
            q[b], k[b], None if lam is None else lam[b], None if ld is None else ld[b]
        )
        # A few products of d = 3 terms and one exp of a sum of n terms per entry.
        assert rel_err(got[b], want) < 10 * (n + 3) * eps(np.float64)


def test_tril_dense_keeps_float32():
    q = np.ones((4, 2), np.float32)
    assert tril_dense(q, q, log_decay=np.full(4, -0.1, np.float32)).dtype == np.float32


@needs_torch
def test_tril_dense_torch_matches_numpy_and_is_differentiable():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    lam, ld = rng.uniform(1, 2, 5), -rng.uniform(0, 1, 5)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, lam, ld)]
    got = tril_dense(*leaves)
    assert rel_err(got, entry_by_entry(q, k, lam, ld)) < 100 * eps(np.float64)
    grads = torch.autograd.grad(got.sum(), leaves)
    assert all(torch.isfinite(gr).all() for gr in grads)


# ------------------------------------------------------------------- recurrences
SHAPES = [(1, 1, 1, 2, 3), (2, 7, 3, 4, 2), (1, 40, 2, 8, 8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("B", "T", "H", "K", "V"), SHAPES)
def test_recurrence_matches_closed_form(B, T, H, K, V, gated, dtype):
    rng = np.random.default_rng(T + K)
    q, k, v, beta, g = inputs(rng, B, T, H, K, V, dtype, strong=True)
    if gated:
        o, s = gated_delta_rule_recurrent(q, k, v, g, beta)
    else:
        o, s = delta_rule_recurrent(q, k, v, beta)
    assert o.dtype == dtype and o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    as64 = [x.astype(np.float64) for x in (q, k, v, beta, g)]
    want = closed_form(*as64[:4], as64[4] if gated else None, K**-0.5)
    assert rel_err(o, want) < tolerance(dtype, T, K, V)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 24),
    H=st.integers(1, 3),
    K=st.integers(1, 6),
    V=st.integers(1, 6),
    split=st.integers(0, 24),
    gated=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_state_carries_the_sequence(T, H, K, V, split, gated, seed):
    """Running the first tokens, then the rest from their final state, is one run;
    the final state from zero is the closed form's S_T = sum_j D_Tj k_j u_j^T."""
    split = min(split, T)
    q, k, v, beta, g = inputs(np.random.default_rng(seed), 1, T, H, K, V)

    def run(sl_, state):
        gate = (g[:, sl_],) if gated else ()
        fn = gated_delta_rule_recurrent if gated else delta_rule_recurrent
        return fn(q[:, sl_], k[:, sl_], v[:, sl_], *gate, beta[:, sl_], initial_state=state)

    o_all, s_all = run(slice(None), None)
    o_head, s_head = run(slice(0, split), None)
    o_tail, s_tail = run(slice(split, None), s_head)
    tol = tolerance(np.float64, T, K, V)
    assert rel_err(np.concatenate([o_head, o_tail], 1), o_all) < tol
    assert rel_err(s_tail, s_all) < tol
    # S_T from the closed form: the output for the query e_i at the last token is row i of S_T.
    # Entrywise against the size of the summed terms: a row of S_T can be much
    # smaller than its terms (cancellation), and is then known only to their scale.
    for i in range(K):
        probe = q.copy()
        probe[:, -1] = 0.0
        probe[:, -1, :, i] = 1.0
        gate = g if gated else None
        want = closed_form(probe, k, v, beta, gate, 1.0)[0, -1]
        size = closed_form(probe, k, v, beta, gate, 1.0, magnitude=True)[0, -1]
        assert (np.abs(s_all[0, :, i, :] - want) <= tol * size.max(-1, keepdims=True)).all()


def test_l2norm_normalises_queries_and_keys():
    rng = np.random.default_rng(3)
    q, k, v, beta, _ = inputs(rng, 1, 6, 2, 4, 3)
    q, k = 3.0 * q, 0.5 * k
    unit = [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k)]
    got, _ = delta_rule_recurrent(q, k, v, beta, use_qk_l2norm=True)
    want = closed_form(*unit, v, beta, None, 4**-0.5)
    assert rel_err(got, want) < tolerance(np.float64, 6, 4, 3)


def test_no_tokens_leaves_the_state():
    s0 = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    o, s = delta_rule_recurrent(*(np.zeros((1, 0, 2, d)) for d in (3, 3, 4)), np.zeros((1, 0, 2)),
                                initial_state=s0)  # fmt: skip
    assert o.shape == (1, 0, 2, 4) and np.array_equal(s, s0)


@needs_torch
@pytest.mark.parametrize("gated", [False, True])
def test_torch_matches_numpy_and_gives_gradients(gated):
    q, k, v, beta, g = inputs(np.random.default_rng(5), 2, 9, 2, 3, 4)
    args = (q, k, v, g, beta) if gated else (q, k, v, beta)
    fn = gated_delta_rule_recurrent if gated else delta_rule_recurrent
    tensors = [torch.tensor(x, requires_grad=True) for x in args]
    o_t, s_t = fn(*tensors, scale=0.7)
    o_n, s_n = fn(*args, scale=0.7)
    assert rel_err(o_t, o_n) < 100 * eps(np.float64) and rel_err(s_t, s_n) < 100 * eps(np.float64)
    grads = torch.autograd.grad((o_t.sum() + s_t.sum(),), tensors)
    assert all(torch.isfinite(gr).all() for gr in grads)


# ----------------------------------------------------------------------------- KDA
def kda_closed_form(q, k, v, g, beta, scale):
    """KDA outputs from S_0 = 0 by one dense triangular solve per value head.

    Per channel, ``exp(G_ic - G_jc)`` is ``exp(sum of g over rows j+1..i)``
    (an exact 0 when one of them is -inf); value head h reads key head
    ``h // (HV // H)``.
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    out = np.zeros(v.shape)
    for b, h in np.ndindex(B, HV):
        kh_index = h // (HV // H)
        qh, kh, bh = q[b, :, kh_index], k[b, :, kh_index], beta[b, :, h]
        factor = np.zeros((T, T, K))  # factor[i, j, c] = prod_{j < m <= i} exp(g[m, c])
        for i in range(T):
            for j in range(i + 1):
                factor[i, j] = np.exp(g[b, j + 1 : i + 1, h].sum(0))
        low = np.einsum("ic,jc,ijc->ij", qh, kh, factor)
        a = np.tril(bh[:, None] * np.einsum("ic,jc,ijc->ij", kh, kh, factor), -1)
        u = sl.solve_triangular(np.eye(T) + a, bh[:, None] * v[b, :, h], lower=True)
        out[b, :, h] = scale * (np.tril(low) @ u)
    return out


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("T", [1, 7, 20])
def test_kda_recurrence_matches_closed_form(T, groups):
    rng = np.random.default_rng(T + groups)
    B, H, K, V = 2, 2, 3, 2
    q, k, _, _, _ = inputs(rng, B, T, H, K, V)
    v = rng.standard_normal((B, T, H * groups, V))
    beta = rng.uniform(0.0, 1.0, (B, T, H * groups))
    g = -rng.uniform(0.0, 3.0, (B, T, H * groups, K))
    g[rng.uniform(size=g.shape) < 0.1] = -np.inf
    o, s = kda_recurrent(q, k, v, g, beta)
    assert o.shape == (B, T, H * groups, V) and s.shape == (B, H * groups, K, V)
    assert rel_err(o, kda_closed_form(q, k, v, g, beta, K**-0.5)) < tolerance(np.float64, T, K, V)


def test_kda_with_equal_channel_decays_is_the_gated_rule():
    rng = np.random.default_rng(5)
    q, k, v, beta, g = inputs(rng, 1, 15, 2, 3, 2)
    s0 = rng.standard_normal((1, 2, 3, 2))
    o, s = kda_recurrent(q, k, v, np.repeat(g[..., None], 3, -1), beta, initial_state=s0)
    o_gated, s_gated = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)
    assert rel_err(o, o_gated) < tolerance(np.float64, 15, 3, 2)
    assert rel_err(s, s_gated) < tolerance(np.float64, 15, 3, 2)
