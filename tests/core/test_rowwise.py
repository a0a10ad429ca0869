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


# --------------------------------------------- the functions, checked in the loop
# tril_solve and tril_matmul with check_finite=True (the default) leave the
# NaN/Inf check to the row-by-row loop; these pin down that every result and
# every error is the one the separate checks give.

HINT = " (pass check_finite=False to skip this check)"


def _function_operands(rng, dtype, n=7, d=3, m=2):
    q, k, diag = operands(rng, (2,), n, d, dtype)
    return {
        "q": q,
        "k": k[:1],  # broadcast against q's batch
        "v": rng.standard_normal((2, n, m)).astype(dtype),
        "diag": diag,
        "log_decay": -rng.uniform(0.0, 1.0, (2, n)).astype(dtype),
    }


def _call(op, a, **kw):
    fn = dplr.tril_solve if op == "solve" else dplr.tril_matmul
    return fn(a["q"], a["k"], a["v"], a.get("diag"), a.get("log_decay"), **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("diag", [False, True])  # a unit diagonal is its own loop
@pytest.mark.parametrize("kind", ["none", "row-resets", "channel"])
def test_functions_against_dense(rng, dtype, diag, kind):
    """tril_solve / tril_matmul (checked in the loop) with the bounds of test_against_dense."""
    batch, n, d, m = (2,), 40, 4, 3
    q, k, lam = operands(rng, batch, n, d, dtype)
    lam = lam if diag else None
    ld = decays(rng, kind, (*batch, n), d)
    ld = None if ld is None else ld.astype(dtype)
    v = rng.standard_normal((*batch, n, m)).astype(dtype)
    dense = dense_reference(q, k, lam, np.zeros((*batch, n)) if ld is None else ld)
    one = np.ones((*batch, n))
    absT = np.abs(dense_reference(np.abs(q), np.abs(k), one if lam is None else np.abs(lam),
                                  0.0 * dense[..., 0]))  # fmt: skip
    cond = np.linalg.cond(dense.reshape(-1, n, n), p=np.inf).max()
    v64 = v.astype(float)
    for tr in (False, True):
        A = dense.swapaxes(-1, -2) if tr else dense
        y = dplr.tril_matmul(q, k, v, lam, ld, transpose=tr)
        scale = ((absT.swapaxes(-1, -2) if tr else absT) @ np.abs(v64)).max()
        assert y.dtype == dtype
        assert np.abs(y - A @ v64).max() <= 2 * (n + d) * eps(dtype) * scale
        x = dplr.tril_solve(q, k, v, lam, ld, transpose=tr)
        pairs = zip(A, v64, strict=True)
        ref = np.stack([sl.solve_triangular(a, b, lower=not tr) for a, b in pairs])
        bound = 4 * (n + d) * eps(dtype) * cond
        assert x.dtype == dtype and rel_err(x, ref) <= bound
        vector = dplr.tril_solve(q[0], k[0], v[0, :, 0], None if lam is None else lam[0],
                                 None if ld is None else ld[0], transpose=tr)  # fmt: skip
        assert vector.shape == (n,) and rel_err(vector, ref[0, :, 0]) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["solve", "matmul"])
@pytest.mark.parametrize("name", ["q", "k", "v", "diag", "log_decay"])
def test_non_finite_input_names_the_argument(rng, dtype, op, name):
    """NaN, +Inf, -Inf at the first, a middle and the last row: the error of the
    separate checks, word for word, with the caller's arrays unchanged; -Inf in a
    log decay is a reset, not an error (also in its first row, which T never reads)."""
    a = _function_operands(rng, dtype)
    n = a["q"].shape[-2]
    what = "NaN or +Inf" if name == "log_decay" else "NaN or Inf"
    for row in (0, n // 2, n - 1):
        for value in (np.nan, np.inf, -np.inf):
            bad = {key: x.copy() for key, x in a.items()}
            bad[name][(0, row) if name in ("diag", "log_decay") else (0, row, -1)] = value
            kept = {key: x.copy() for key, x in bad.items()}
            for tr in (False, True):
                if name == "log_decay" and value == -np.inf:
                    assert np.isfinite(_call(op, bad, transpose=tr)).all()
                    continue
                with pytest.raises(ValueError) as info:
                    _call(op, bad, transpose=tr)
                assert str(info.value) == f"'{name}' contains {what}{HINT}"
                assert info.value.__context__ is None  # raised afresh, not while handling
                for key, x in bad.items():
                    np.testing.assert_array_equal(x, kept[key])  # NaN == NaN here
            if name != "log_decay":  # (where +Inf still fails the sign check)
                out = _call(op, bad, check_finite=False)  # opted out: no error
                assert out.shape == a["v"].shape


def test_the_first_bad_argument_is_named_as_before(rng):
    """The order of the separate checks: q, k, diag, log_decay, then (after the
    singularity check of a solve) v."""
    a = _function_operands(rng, np.float64)
    cases = [(("q", "v"), "'q'"), (("k", "diag"), "'k'"), (("diag", "log_decay"), "'diag'"),
             (("log_decay", "v"), "'log_decay'")]  # fmt: skip
    for names, first in cases:
        bad = {key: x.copy() for key, x in a.items()}
        for name in names:
            bad[name][0, 3] = np.nan
        for op in ("solve", "matmul"):
            with pytest.raises(ValueError, match=f"^{first} contains NaN"):
                _call(op, bad)
    bad = {key: x.copy() for key, x in a.items()}
    bad["v"][1, 2, 0] = np.inf
    bad["diag"][1, 5] = 0.0
    with pytest.raises(dplr.SingularMatrixError):
        _call("solve", bad)
    with pytest.raises(ValueError, match=r"^'v' contains NaN or Inf"):
        _call("matmul", bad)
    bad["log_decay"][1, 4] = np.inf  # +Inf: the finite check's error, not the sign check's
    with pytest.raises(ValueError, match=r"^'log_decay' contains NaN or \+Inf"):
        _call("matmul", bad)


def test_run_refuses_to_vouch_for_what_it_did_not_read():
    """_rowwise.run with check_finite and nothing to read (m = 0) raises NonFiniteInput."""
    q = np.full((5, 2), np.nan)
    with pytest.raises(_rowwise.NonFiniteInput):
        _rowwise.run(q, q, None, None, np.ones((5, 0)), None, solve=True, check_finite=True)
    with pytest.raises(ValueError, match="'q' contains NaN or Inf"):
        dplr.tril_solve(q, q, np.ones((5, 0)))
