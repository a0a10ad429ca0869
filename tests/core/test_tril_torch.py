"""LowRankTril with torch tensors: results, dtypes, and hand-written gradients.

Gradients are checked two ways: ``torch.autograd.gradcheck`` (finite
differences, float64) and, one by one by name, against autograd through the
dense matrix and ``torch.linalg.solve_triangular`` (agreement to ~1e-10, far
above the 1e-15 rounding of these O(10)-sized problems).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dplr  # noqa: E402


def make(seed, batch, n, d, m, dtype=torch.float64, decay=True):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k = randn(*batch, n, d) / d**0.5, randn(*batch, n, d) / d**0.5
    diag = 1.0 + torch.rand(*batch, n, generator=g, dtype=dtype)
    ld = -0.3 * torch.rand(*batch, n, generator=g, dtype=dtype) if decay else None
    v = randn(*batch, n, m)
    return q, k, diag, ld, v


def dense_torch(q, k, diag, ld):
    """Differentiable dense T from the definition (the reference for gradients)."""
    n = q.shape[-2]
    low = q @ k.mT
    if ld is not None:
        big_g = ld.cumsum(-1)
        rel = big_g[..., :, None] - big_g[..., None, :]
        low = low * torch.exp(rel.masked_fill(~torch.ones(n, n, dtype=bool).tril(-1), -torch.inf))
    return low.tril(-1) + torch.diag_embed(diag)


OPS = {
    "matmul": lambda T, v, tr, c: T.matmul(v, transpose=tr, chunk_size=c),
    "solve": lambda T, v, tr, c: T.solve(v, transpose=tr, chunk_size=c),
}


def dense_op(name, A, v, tr):
    A = A.mT if tr else A
    if name == "matmul":
        return A @ v
    return torch.linalg.solve_triangular(A, v, upper=tr)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("name", ["matmul", "solve"])
@pytest.mark.parametrize("decay", [False, True])
def test_values_and_gradients_by_name(name, transpose, decay):
    q, k, diag, ld, v = make(0, (2,), 13, 3, 2, decay=decay)
    leaves = {"q": q, "k": k, "diag": diag, "log_decay": ld, "v": v}
    leaves = {key: x.requires_grad_() for key, x in leaves.items() if x is not None}
    weights = torch.randn(2, 13, 2, dtype=torch.float64)
    out = OPS[name](dplr.LowRankTril(q, k, diag, ld), v, transpose, 5)
    ref = dense_op(name, dense_torch(q, k, diag, ld), v, transpose)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    want = torch.autograd.grad((ref * weights).sum(), list(leaves.values()))
    for key, g_got, g_want in zip(leaves, got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10, msg=f"d/d{key}")


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_solve_and_matmul(transpose):
    q, k, diag, ld, v = make(1, (), 9, 2, 2)
    args = [x.requires_grad_() for x in (q, k, diag, ld, v)]

    def f(q, k, diag, ld, v):
        T = dplr.LowRankTril(q, k, diag, ld)
        return T.solve(v, transpose=transpose, chunk_size=4), T.matmul(v, chunk_size=4)

    assert torch.autograd.gradcheck(f, args)


def test_gradcheck_inverse_and_broadcast_batches():
    q, k, diag, ld, _ = make(2, (), 7, 2, 1)
    q = q.expand(2, 7, 2).clone().requires_grad_()  # batch (2,) against unbatched k
    args = [q, k.requires_grad_(), diag.requires_grad_(), ld.requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda q, k, diag, ld: dplr.LowRankTril(q, k, diag, ld).inv(chunk_size=3), args
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_keep_type_dtype_and_match_numpy(dtype):
    q, k, diag, ld, v = make(3, (3,), 40, 4, 5, dtype=dtype)
    T = dplr.LowRankTril(q, k, diag, ld)
    Tn = dplr.LowRankTril(*(x.double().numpy() for x in (q, k, diag, ld)))
    tol = 50 * torch.finfo(dtype).eps
    for transpose in (False, True):
        x = T.solve(v, transpose=transpose, chunk_size=16)
        assert isinstance(x, torch.Tensor) and x.dtype == dtype
        ref = Tn.solve(v.double().numpy(), transpose=transpose)
        np.testing.assert_allclose(x.double().numpy(), ref, rtol=tol, atol=tol)
    assert T.inv().dtype == dtype and T.to_dense().dtype == dtype
    sign, logabs = T.slogdet()
    assert sign.shape == (3,) and logabs.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    q, k, diag, ld, v = make(4, (), 30, 4, 2, dtype=torch.float32)
    T = dplr.LowRankTril(q.to(dtype), k.to(dtype), diag.to(dtype), ld.to(dtype))
    x = T.solve(v.to(dtype))
    assert x.dtype == dtype
    ref = dplr.LowRankTril(q.to(dtype).float(), k.to(dtype).float(), diag.to(dtype).float(),
                           ld.to(dtype).float()).solve(v.to(dtype).float())  # fmt: skip
    torch.testing.assert_close(x.float(), ref, rtol=torch.finfo(dtype).eps * 4, atol=1e-2)


def test_mixing_numpy_and_torch_is_refused():
    q, k, _, _, v = make(5, (), 6, 2, 1)
    T = dplr.LowRankTril(q, k)
    with pytest.raises(TypeError, match="cannot mix NumPy arrays and torch tensors"):
        T.solve(v.numpy())
    with pytest.raises(TypeError, match="cannot mix"):
        dplr.LowRankTril(q, k.numpy())


def test_torch_inputs_not_modified():
    q, k, diag, ld, v = make(6, (), 20, 3, 2)
    copies = [x.clone() for x in (q, k, diag, ld, v)]
    T = dplr.LowRankTril(q, k, diag, ld)
    T.solve(v), T.matmul(v, transpose=True), T.inv()
    for x, c in zip((q, k, diag, ld, v), copies, strict=True):
        assert torch.equal(x, c)


@pytest.mark.parametrize("decay", [False, True])
def test_device_code_path_matches_compiled_cpu_path(monkeypatch, decay):
    """The pure-torch branches (what CUDA tensors run) give the compiled loops' results.

    Forced on CPU tensors by making the backend believe they are elsewhere;
    both against the dense solve, to rounding (1e-12 on these O(1) problems).
    """
    from dplr._runtime import backend as _backend

    q, k, diag, ld, v = make(3, (2,), 37, 5, 4, decay=decay)
    T = dplr.LowRankTril(q, k, diag, ld)
    compiled = T.solve(v, chunk_size=8)
    monkeypatch.setattr(_backend, "_all_cpu", lambda *xs: False)
    pure = T.solve(v, chunk_size=8)
    dense = torch.linalg.solve_triangular(T.to_dense(), v, upper=False)
    assert torch.allclose(pure, dense, rtol=0, atol=1e-12)
    assert torch.allclose(compiled, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", ["solve", "matmul", "inv"])
def test_second_derivatives_raise_a_clear_error(op):
    """The hand-written backward is first order only: say so instead of failing obscurely."""
    q, k, diag, ld, v = make(7, (), 9, 2, 2)
    q.requires_grad_()
    T = dplr.LowRankTril(q, k, diag, ld)
    call = {"solve": lambda: T.solve(v), "matmul": lambda: T @ v, "inv": T.inv}[op]
    (dq,) = torch.autograd.grad(call().sum(), q, create_graph=True)
    (plain,) = torch.autograd.grad(call().sum(), q)
    torch.testing.assert_close(dq, plain, rtol=0, atol=0)  # first order unchanged
    with pytest.raises(NotImplementedError, match=r"second derivatives of dplr\.LowRankTril"):
        dq.sum().backward()
