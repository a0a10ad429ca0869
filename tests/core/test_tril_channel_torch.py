"""Per-channel decay and resets with torch: values, states and hand-written gradients.

References are differentiable dense torch computations written here from the
definition (the -inf entries enter as exact zeros through ``torch.where``, so
the reference itself has no NaN).  Agreement to 1e-10 in float64 for these
O(10)-sized problems is far above their ~1e-15 rounding.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import dplr  # noqa: E402
from dplr.core._grad import torch_functions  # noqa: E402

F64 = torch.float64


def channel_decay(ld, d):
    """(..., n) or (..., n, d) -> (..., n, d)."""
    return (
        ld
        if ld.ndim >= 2 and ld.shape[-1] == d and ld.ndim > 1
        else ld[..., None].expand(*ld.shape, d)
    )


def pair_factors(ld, d):
    """E (..., n, n, d): exp(sum of log decays j+1..i) for i > j, else 0, differentiably."""
    ld = channel_decay(ld, d)
    n = ld.shape[-2]
    reset = torch.isinf(ld)
    finite = torch.where(reset, torch.zeros_like(ld), ld)
    g, r = finite.cumsum(-2), reset.to(ld.dtype).cumsum(-2)
    ok = torch.ones(n, n, dtype=torch.bool).tril(-1)[..., None] & (
        r[..., :, None, :] == r[..., None, :, :]
    )
    rel = g[..., :, None, :] - g[..., None, :, :]
    return torch.exp(torch.where(ok, rel, torch.full_like(rel, -torch.inf)))


def dense_torch(q, k, diag, ld):
    low = (q[..., :, None, :] * k[..., None, :, :] * pair_factors(ld, q.shape[-1])).sum(-1)
    return low + torch.diag_embed(diag)


def from_start(ld, d):
    """exp(G_i) per channel with resets: (..., n, d)."""
    ld = channel_decay(ld, d)
    reset = torch.isinf(ld)
    g = torch.where(reset, torch.zeros_like(ld), ld).cumsum(-2)
    return torch.where(reset.cumsum(-2) == 0, torch.exp(g), torch.zeros_like(g))


def make(seed, batch, n, d, m, mode, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k = randn(*batch, n, d) / d**0.5, randn(*batch, n, d) / d**0.5
    diag = 1.0 + rand(*batch, n)
    if mode == "scalar-resets":
        ld = -rand(*batch, n)
        ld[..., 3] = -torch.inf
    elif mode == "extreme":  # sub-blocks shorter than the chunk in float64
        ld = -200.0 - 100.0 * rand(*batch, n, d)
    else:
        ld = -0.5 * rand(*batch, n, d)
        if mode == "resets":
            ld[..., 5, 1] = ld[..., 6, :] = -torch.inf
            ld[..., 0] = -torch.inf
    return q, k, diag, ld, randn(*batch, n, m)


def dense_op(name, A, v, tr):
    A = A.mT if tr else A
    return A @ v if name == "matmul" else torch.linalg.solve_triangular(A, v, upper=tr)


@pytest.mark.parametrize("mode", ["mild", "resets", "scalar-resets", "extreme"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("name", ["matmul", "solve"])
def test_values_and_gradients_against_dense_autograd(name, transpose, mode):
    q, k, diag, ld, v = make(0, (2,), 21, 3, 2, mode)
    leaves = {"q": q, "k": k, "diag": diag, "log_decay": ld, "v": v}
    for x in leaves.values():
        x.requires_grad_()
    T = dplr.LowRankTril(q, k, diag, ld, check_finite=False)
    chunk = 8
    out = (
        T.matmul(v, transpose=transpose, chunk_size=chunk)
        if name == "matmul"
        else T.solve(v, transpose=transpose, chunk_size=chunk)
    )
    ref = dense_op(name, dense_torch(q, k, diag, ld), v, transpose)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    want = torch.autograd.grad((ref * weights).sum(), list(leaves.values()))
    for key, g_got, g_want in zip(leaves, got, want, strict=True):
        assert torch.isfinite(g_got).all(), key
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10, msg=f"d/d{key}")


def test_gradients_at_a_moderate_size():
    """n = 200, d = 8, chunk 32, decays from 0 to -5 mixed per channel."""
    q, k, diag, ld, v = make(2, (), 200, 8, 3, "mild")
    ld = ld * 10.0
    leaves = [x.requires_grad_() for x in (q, k, diag, ld, v)]
    x = dplr.tril_solve(q, k, v, diag, ld, chunk_size=32)
    ref = torch.linalg.solve_triangular(dense_torch(q, k, diag, ld), v, upper=False)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((x**2).sum(), leaves)
    want = torch.autograd.grad((ref**2).sum(), leaves)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["mild", "resets"])
def test_gradcheck(mode):
    q, k, diag, ld, v = make(3, (), 9, 2, 2, mode)
    args = [x.requires_grad_() for x in (q, k, diag, ld, v)]

    def f(q, k, diag, ld, v):
        T = dplr.LowRankTril(q, k, diag, ld, check_finite=False)
        return T.solve(v, chunk_size=4), T.solve(v, True, 4), T.matmul(v, chunk_size=4)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("mode", ["mild", "resets", "scalar-resets"])
def test_initial_and_final_state_against_dense(mode):
    """The kernels' state form: Y = T^-1 (V - exp(G) ⊙ (Q h0)), h_n = Diag(exp(G_n - G_j))
    weighted sum of k_j y_j^T plus Diag(exp(G_n)) h0; values and gradcheck."""
    solve_fn, matmul_fn = torch_functions()
    q, k, diag, ld, v = make(4, (2,), 10, 3, 2, mode)
    h0 = torch.randn(2, 3, 2, dtype=F64)
    e_g = from_start(ld, 3)
    A = dense_torch(q, k, diag, ld)
    y, hn = solve_fn.apply(q, k, diag, ld, v, h0, False, 4)
    y_ref = torch.linalg.solve_triangular(A, v - (q * e_g) @ h0, upper=False)
    tail = pair_factors(ld, 3)[..., -1, :, :]  # row n-1: exp(G_n - G_j) for j < n - 1
    tail[..., -1, :] = 1.0
    hn_ref = e_g[..., -1, :, None] * h0 + (k * tail).mT @ y_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hn, hn_ref, rtol=1e-12, atol=1e-12)
    prod = matmul_fn.apply(q, k, diag, ld, v, h0, False, 4)
    torch.testing.assert_close(prod, A @ v + (q * e_g) @ h0, rtol=1e-12, atol=1e-12)
    args = [x.requires_grad_() for x in (q, k, diag, ld, v, h0)]
    assert torch.autograd.gradcheck(lambda *a: solve_fn.apply(*a, False, 4), args, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: matmul_fn.apply(*a, False, 4), args, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_for_any_log_decay(dtype):
    """Decays from 0 to -1e4 and -inf, float32 and float64: all results and gradients finite."""
    gen = torch.Generator().manual_seed(5)
    n, d = 100, 8
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
    q = 0.9 * k
    choices = torch.tensor([0.0, -0.01, -5.0, -80.0, -1e4, -torch.inf], dtype=dtype)
    ld = choices[torch.randint(0, 6, (n, d), generator=gen)]
    v = torch.randn(n, 4, generator=gen, dtype=dtype)
    leaves = [x.requires_grad_() for x in (q, k, ld, v)]
    T = dplr.LowRankTril(q, k, log_decay=ld, check_finite=False)
    outs = [T.solve(v, chunk_size=32), T.solve(v, True, 16), T.matmul(v, chunk_size=8)]
    grads = torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
    for x in (*outs, *grads):
        assert torch.isfinite(x).all()
