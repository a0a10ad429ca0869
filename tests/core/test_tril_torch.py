"""LowRankTril with torch tensors: results, dtypes, and hand-written gradients.

Gradients are checked two ways: ``torch.autograd.gradcheck`` (finite
differences, float64) and, one by one by name, against autograd through the
dense matrix and ``torch.linalg.solve_triangular`` (agreement to ~1e-10, far
above the 1e-15 rounding of these O(10)-sized problems).

Every test that runs a solve does so on both code paths of the torch
backend: ``compiled`` (CPU tensors handed to the compiled loops) and
``device`` (the pure-torch loops that tensors on other devices run), forced
on CPU tensors by the ``path`` fixture.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import dplr  # noqa: E402
from dplr.reference import tril_dense  # noqa: E402


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
    return tril_dense(q, k, diag, ld)


OPS = {
    "matmul": lambda T, v, tr, c: T.matmul(v, transpose=tr, chunk_size=c),
    "solve": lambda T, v, tr, c: T.solve(v, transpose=tr, chunk_size=c),
    "inv": lambda T, v, tr, c: T.inv(chunk_size=c) @ v,
}


def dense_op(name, A, v, tr):
    A = A.mT if tr else A
    if name == "matmul":
        return A @ v
    return torch.linalg.solve_triangular(A, v, upper=tr)


@pytest.mark.parametrize(
    ("name", "transpose"),
    [("matmul", False), ("matmul", True), ("solve", False), ("solve", True), ("inv", False)],
)
@pytest.mark.parametrize("decay", [False, True])
def test_values_and_gradients_by_name(name, transpose, decay, path):
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


def solve_bound(dense, absolute, x_ref, n, d, eps):
    """Relative error bound of a solve with componentwise backward error
    ``(n + d) eps |T|_r`` (Skeel's condition number; see tests/core/test_tril.py)."""
    skeel = (dense.inverse().abs() @ absolute @ x_ref.abs()).amax()
    return (n + d) * eps * float(skeel / x_ref.abs().amax())


def rel_err(a, b):
    return float((a.double() - b).abs().amax() / b.abs().amax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_keep_type_dtype_and_match_dense(dtype, path):
    q, k, diag, ld, v = make(3, (3,), 40, 4, 5, dtype=dtype)
    T = dplr.LowRankTril(q, k, diag, ld)
    q64, k64, diag64, ld64, v64 = (x.double() for x in (q, k, diag, ld, v))  # the same inputs
    dense = tril_dense(q64, k64, diag64, ld64)
    absolute = tril_dense(q64.abs(), k64.abs(), diag64.abs(), ld64)
    for transpose in (False, True):
        x = T.solve(v, transpose=transpose, chunk_size=16)
        assert isinstance(x, torch.Tensor) and x.dtype == dtype
        a, a_abs = (m.mT if transpose else m for m in (dense, absolute))
        ref = torch.linalg.solve_triangular(a, v64, upper=transpose)
        bound = solve_bound(a, a_abs, ref, 40, 4, torch.finfo(dtype).eps)
        assert bound < 1e-2 and rel_err(x, ref) <= bound
    inv = T.inv()
    ref = torch.linalg.inv(dense)
    assert inv.dtype == dtype and T.to_dense().dtype == dtype
    assert rel_err(inv, ref) <= solve_bound(dense, absolute, ref, 40, 4, torch.finfo(dtype).eps)
    sign, logabs = T.slogdet()
    assert sign.shape == (3,) and logabs.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype, path):
    """Against the float64 solve of the rounded inputs: float32 arithmetic, then one
    rounding to ``dtype`` (half its eps).  Computing in ``dtype`` itself would not pass."""
    q, k, diag, ld, v = make(4, (), 30, 4, 2, dtype=torch.float32)
    halves = [x.to(dtype) for x in (q, k, diag, ld, v)]
    T = dplr.LowRankTril(*halves[:4])
    x = T.solve(halves[4])
    assert x.dtype == dtype
    q64, k64, diag64, ld64, v64 = (h.double() for h in halves)
    dense = tril_dense(q64, k64, diag64, ld64)
    absolute = tril_dense(q64.abs(), k64.abs(), diag64.abs(), ld64)
    ref = torch.linalg.solve_triangular(dense, v64, upper=False)
    f32 = solve_bound(dense, absolute, ref, 30, 4, torch.finfo(torch.float32).eps)
    assert rel_err(x, ref) <= 0.5 * torch.finfo(dtype).eps + f32


def test_torch_inputs_not_modified():
    q, k, diag, ld, v = make(6, (), 20, 3, 2)
    copies = [x.clone() for x in (q, k, diag, ld, v)]
    T = dplr.LowRankTril(q, k, diag, ld)
    T.solve(v), T.matmul(v, transpose=True), T.inv()
    for x, c in zip((q, k, diag, ld, v), copies, strict=True):
        assert torch.equal(x, c)


@pytest.mark.parametrize("decay", [False, True])
def test_device_code_path_is_really_taken(monkeypatch, decay):
    """The ``path`` fixture's "device" runs the pure-torch loops, not the compiled ones."""
    from dplr._runtime import backend as _backend
    from dplr._runtime.backend import NumpyOps

    q, k, diag, ld, v = make(3, (2,), 37, 5, 4, decay=decay)
    T = dplr.LowRankTril(q, k, diag, ld)
    monkeypatch.setattr(_backend, "_all_cpu", lambda *xs: False)

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled loops ran on the device path")

    for name in ("chunk_blocks", "substitution_pass", "solve_lower_blocks"):
        monkeypatch.setattr(NumpyOps, name, staticmethod(refuse))
    pure = T.solve(v, chunk_size=8)
    dense = torch.linalg.solve_triangular(dense_torch(q, k, diag, ld), v, upper=False)
    assert torch.allclose(pure, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", ["solve", "matmul", "inv"])
def test_second_derivatives_raise_a_clear_error(op, path):
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


@pytest.mark.parametrize("transpose", [False, True])
def test_minus_inf_decay_is_an_exact_zero(transpose, path):
    q, k, diag, ld, v = make(8, (2,), 19, 3, 2)
    ld[..., [1, 9, 18]] = -torch.inf
    rows = torch.arange(19)
    below = rows[:, None] > rows[None, :]
    # D[i, j] = prod_{s = j+1 .. i} exp(ld[s]): products, so that exp(-inf) = 0 stays 0
    a = ld.exp()
    decay = torch.stack(
        [torch.stack([a[..., j + 1 : i + 1].prod(-1) for j in range(19)], -1) for i in range(19)],
        -2,
    )
    dense = torch.where(below, (q @ k.mT) * decay, 0.0) + torch.diag_embed(diag)
    T = dplr.LowRankTril(q, k, diag, ld)
    a_t = dense.mT if transpose else dense
    x = T.solve(v, transpose=transpose, chunk_size=4)
    ref = torch.linalg.solve_triangular(a_t, v, upper=transpose)
    torch.testing.assert_close(x, ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(T.matmul(v, transpose=transpose, chunk_size=4), a_t @ v)
