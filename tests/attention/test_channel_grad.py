"""dplr.attention._channel_grad: the per-key-channel blocks' pull-back, against autograd.

The blocks of one chunk, with ``G`` the cumulative log decay per channel and
resets (``g = -inf``) splitting the chunk into segments::

    A_ij = sum_c kb_ic k_jc exp(G_ic - G_jc)   (i > j, same segment in channel c)
    P_ij = sum_c q_ic  k_jc exp(G_ic - G_jc)   (i > j, likewise),   P_ii = q_i . k_i

are written out densely here in torch (float64) and differentiated by
autograd for the loss ``sum(E_A * A) + sum(E_P * P)``; the compiled pull-back
must give the same dkb, dq, dk and dG.  Bound: every gradient entry is a sum
of at most 2 L K products of factors <= 1 with the inputs, so rounding stays
within ``100 L K eps`` of the largest term; a wrong anchor, sign or segment is
O(1) off.
"""

from __future__ import annotations

import numpy as np
import pytest

from dplr._runtime.gemm import gemm_scratch
from dplr.attention._channel_grad import _channel_blocks_back

torch = pytest.importorskip("torch")

FLOOR, BUDGET = 700.0, 600.0  # float64 limits of the chunked forward


def _chunk(rng, L: int, K: int, decay: float, resets: list[tuple[int, int]]):
    g = -decay * rng.uniform(0.0, 1.0, (L, K))
    reset = np.zeros((L, K), dtype=bool)
    for i, p in resets:
        reset[i, p] = True
    finite = np.where(reset, 0.0, g)
    gc, rc = np.cumsum(finite, 0), np.cumsum(reset, 0).astype(np.float64)
    fac = np.where(reset, 0.0, np.exp(finite))  # exp(G_i - G_(i-1)), exactly 0 at a reset
    kb, qs, kn = rng.standard_normal((3, L, K))
    e_a = np.tril(rng.standard_normal((L, L)), -1)
    e_p = np.tril(rng.standard_normal((L, L)))
    return kb, qs, kn, gc, rc, fac, e_a, e_p


def _reference(kb, qs, kn, gc, rc, e_a, e_p):
    kb, qs, kn, gc = (torch.tensor(x, requires_grad=True) for x in (kb, qs, kn, gc))
    L = kn.shape[0]
    rc_t = torch.tensor(rc)
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool), -1)[..., None]
    same = (rc_t[:, None, :] == rc_t[None, :, :]) & strict
    diff = gc[:, None, :] - gc[None, :, :]
    factor = torch.where(same, torch.exp(torch.where(same, diff, 0.0)), 0.0)  # (L, L, K)
    A = (kb[:, None, :] * factor * kn[None, :, :]).sum(-1)
    P = (qs[:, None, :] * factor * kn[None, :, :]).sum(-1) + torch.diag((qs * kn).sum(-1))
    loss = (torch.tensor(e_a) * A).sum() + (torch.tensor(e_p) * P).sum()
    return [t.detach().numpy() for t in torch.autograd.grad(loss, (kb, qs, kn, gc))]


def _compiled(kb, qs, kn, gc, rc, fac, e_a, e_p, budget):
    L, K = kn.shape
    rows = np.zeros((4 * L, K))
    rows[3 * L :] = fac
    work = np.zeros((4 * L, K))
    grads = [np.zeros((L, K)) for _ in range(4)]
    _channel_blocks_back(kb, qs, kn, gc, rc, rows, e_a.copy(), e_p.copy(), *grads, work,
                         FLOOR, budget, gemm_scratch(np.dtype(np.float64)))  # fmt: skip
    return grads


@pytest.mark.parametrize(
    ("L", "K", "decay", "budget", "resets"),
    [
        (1, 3, 1.0, BUDGET, []),  # one row: only P_00
        (16, 5, 0.5, BUDGET, []),  # one sub-block
        (16, 5, 4.0, 10.0, []),  # steep decay, small budget: sub-blocks of 2 rows
        (32, 4, 2.0, 20.0, [(9, 1), (20, 3)]),  # resets between and inside sub-blocks
        (32, 4, 0.5, BUDGET, [(0, 0), (31, 2), (7, 1)]),  # resets inside the one sub-block
        (13, 6, 30.0, 40.0, [(5, 0)]),  # length not a power of two, decays of e^-30
    ],
)
def test_pull_back_matches_autograd(L, K, decay, budget, resets):
    rng = np.random.default_rng(L * 7 + K)
    kb, qs, kn, gc, rc, fac, e_a, e_p = _chunk(rng, L, K, decay, resets)
    got = _compiled(kb, qs, kn, gc, rc, fac, e_a, e_p, budget)
    want = _reference(kb, qs, kn, gc, rc, e_a, e_p)
    eps = np.finfo(np.float64).eps
    for name, g, w in zip(("dkb", "dq", "dk", "dG"), got, want, strict=True):
        scale = max(np.abs(w).max(), 1.0)
        assert np.abs(g - w).max() <= 100 * L * K * eps * scale, name
