"""The NumPy/torch array shim: every operation against a NumPy/SciPy reference."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import scipy.linalg

from dplr._runtime import backend, tuning
from dplr._runtime.backend import NumpyOps, TorchOps, backend_of, is_torch

try:
    import torch
except ImportError:  # the torch extra is optional
    torch = None

RUNTIME = pathlib.Path(backend.__file__).parent


def test_the_runtime_imports_nothing_of_the_algorithms():
    # Data flows one way: core -> runtime.  The compiled loops come in as
    # arguments, never as imports.
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert node.level <= 1 and not module.startswith("dplr"), (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dplr") for a in node.names), path.name


def numpy_and_torch():
    yield NumpyOps, np.asarray
    if torch is not None:
        yield TorchOps, torch.from_numpy


BACKENDS = list(numpy_and_torch())
IDS = [ops.__name__ for ops, _ in BACKENDS]


def as_numpy(x):
    return x.numpy() if is_torch(x) else np.asarray(x)


def test_backend_of():
    assert backend_of(np.ones(2)) is NumpyOps
    assert not is_torch(np.ones(2))
    if torch is not None:
        assert backend_of(torch.ones(2)) is TorchOps and is_torch(torch.ones(2))


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
def test_elementwise_and_shape_operations(ops, wrap, rng):
    x = rng.standard_normal((2, 3, 4))
    t = wrap(x.copy())
    np.testing.assert_allclose(as_numpy(ops.exp(t)), np.exp(x), rtol=1e-15)
    np.testing.assert_array_equal(as_numpy(ops.flip(t, -2)), x[:, ::-1])
    np.testing.assert_array_equal(as_numpy(ops.where(t > 0, t, -1.0)), np.where(x > 0, x, -1.0))
    np.testing.assert_array_equal(as_numpy(ops.concat([t, t], 1)), np.concatenate([x, x], 1))
    padded = as_numpy(ops.pad_axis(t, -2, 2, 5.0))
    np.testing.assert_array_equal(padded, np.concatenate([x, np.full((2, 2, 4), 5.0)], -2))
    assert ops.pad_axis(t, 0, 0) is t
    np.testing.assert_array_equal(as_numpy(ops.broadcast_to(wrap(x[0]), (2, 3, 4))), x[[0, 0]])
    copy = ops.copy(t)
    copy[...] = 0
    np.testing.assert_array_equal(as_numpy(t), x)  # a copy, not a view
    for fresh in (ops.zeros((2, 5), t), ops.empty((2, 5), t)):
        assert tuple(fresh.shape) == (2, 5) and as_numpy(fresh).dtype == x.dtype
    assert not as_numpy(ops.zeros((2, 5), t)).any()
    np.testing.assert_array_equal(as_numpy(ops.eye(3, t)), np.eye(3))
    np.testing.assert_array_equal(as_numpy(ops.strict_lower_mask(4, t)), np.tri(4, 4, -1) > 0)
    sq = rng.standard_normal((2, 4, 4))  # a stack of square blocks
    np.testing.assert_array_equal(as_numpy(ops.keep_strict_lower(wrap(sq.copy()))), np.tril(sq, -1))
    np.testing.assert_array_equal(as_numpy(ops.multiply_(wrap(x.copy()), t)), x * x)


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
@pytest.mark.parametrize("workers", ["1", "3"])
def test_matmul_split_over_threads_equals_the_product(monkeypatch, ops, wrap, workers, rng):
    monkeypatch.setenv("DPLR_NUM_THREADS", workers)
    monkeypatch.setattr(tuning, "PARALLEL_MIN_FLOPS", 0.0)
    a, b = rng.standard_normal((5, 2, 7, 4)), rng.standard_normal((5, 2, 4, 3))
    np.testing.assert_allclose(as_numpy(ops.matmul(wrap(a), wrap(b))), a @ b, rtol=1e-14)
    # broadcasting batch shapes are left to `@`
    np.testing.assert_allclose(as_numpy(ops.matmul(wrap(a), wrap(b[0]))), a @ b[0], rtol=1e-14)


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_solve_lower_dense_against_scipy(ops, wrap, dtype, rng):
    lower = np.tril(rng.standard_normal((3, 6, 6))) + 4 * np.eye(6)
    lower[..., 0, 5] = np.nan  # above the triangle: never read
    b = rng.standard_normal((3, 6, 2))
    got = as_numpy(ops.solve_lower_dense(wrap(lower.astype(dtype)), wrap(b.astype(dtype))))
    tri = np.tril(lower)
    ref = np.stack([scipy.linalg.solve_triangular(tri[i], b[i], lower=True) for i in range(3)])
    # forward substitution is backward stable: cond ~ 10 here, bound 50 n eps
    np.testing.assert_allclose(got, ref, rtol=50 * 6 * np.finfo(dtype).eps, atol=0)
    one = as_numpy(ops.solve_lower_dense(wrap(lower[0]), wrap(b)))  # one factor, three b
    ref_one = [scipy.linalg.solve_triangular(tri[0], b[i], lower=True) for i in range(3)]
    np.testing.assert_allclose(one, np.stack(ref_one), rtol=1e-13)


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
def test_cholesky_flagged_marks_the_failures_and_keeps_the_rest(ops, wrap, rng):
    g = rng.standard_normal((4, 5, 5))
    spd = g @ g.mT + 5 * np.eye(5)
    spd[2] = -np.eye(5)  # not positive definite
    lt, ok = ops.cholesky_flagged(wrap(spd))
    lt, ok = as_numpy(lt), as_numpy(ok)
    np.testing.assert_array_equal(ok, [True, True, False, True])
    np.testing.assert_array_equal(lt[2], np.eye(5))
    for i in (0, 1, 3):
        np.testing.assert_allclose(lt[i], np.linalg.cholesky(spd[i]), rtol=1e-13)
    lt, ok = ops.cholesky_flagged(wrap(spd[[0, 1]]))
    assert as_numpy(ok).all()


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
def test_qr_complete_is_an_orthogonal_times_an_upper_triangle(ops, wrap, rng):
    a = rng.standard_normal((3, 7, 4))
    q, r = (as_numpy(x) for x in ops.qr_complete(wrap(a)))
    assert q.shape == (3, 7, 7) and r.shape == (3, 7, 4)
    np.testing.assert_allclose(q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(7), q.shape),
                               atol=1e-14)  # fmt: skip
    assert np.all(np.tril(r, -1) == 0)
    np.testing.assert_allclose(q @ r, a, atol=1e-14)


def _copy_tri(src, dst, rows):
    """A plain kernel for copy_lower: the lower triangle of src, zeros above."""
    assert rows
    dst[...] = np.tril(src)


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
def test_copy_lower_broadcasts_and_zeroes_above(ops, wrap, rng):
    src = rng.standard_normal((5, 5))
    dst = wrap(np.full((2, 3, 5, 5), np.nan))
    ops.copy_lower(dst, wrap(src), kernel=_copy_tri)
    np.testing.assert_array_equal(as_numpy(dst), np.broadcast_to(np.tril(src), (2, 3, 5, 5)))


def forward_substitution(L, B, X):
    """A plain kernel for the stack solve: X[b] = L[b]^-1 B[b] (SciPy per block)."""
    for i in range(L.shape[0]):
        X[i] = scipy.linalg.solve_triangular(L[i], B[i], lower=True)


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
def test_solve_lower_blocks_runs_the_kernel_it_is_given_on_every_block(ops, wrap, rng):
    L = np.tril(rng.standard_normal((2, 7, 4, 4))) + 3 * np.eye(4)
    B = rng.standard_normal((2, 7, 4, 3))
    got = as_numpy(ops.solve_lower_blocks(wrap(L), wrap(B), kernel=forward_substitution))
    np.testing.assert_allclose(got, np.linalg.solve(L, B), rtol=1e-12)


def strict_product(q, k, lam, mask, out):
    """A plain kernel for the blocks: lower triangle of diag(lam) + tril(q k^T ⊙ mask, -1)."""
    blocks = np.tril(q @ k.transpose(0, 2, 1), -1)
    if mask.shape[0]:
        blocks *= mask
    blocks += lam[:, :, None] * np.eye(q.shape[1])
    rows, cols = np.tril_indices(q.shape[1])
    out[:, rows, cols] = blocks[:, rows, cols]


@pytest.mark.parametrize("masked", [False, True])
def test_chunk_blocks_fills_the_out_array_through_the_kernel(rng, masked):
    # Results must land in `out`; a non-contiguous one would get a copy instead.
    q, k = rng.standard_normal((2, 4, 3, 5))
    lam = 1.0 + rng.random((4, 3))
    mask = np.tril(rng.random((4, 3, 3)), -1) if masked else None
    out = np.empty((4, 3, 6))[..., ::2]
    with pytest.raises(ValueError, match="'out' must be C-contiguous"):
        NumpyOps.chunk_blocks(q, k, lam, mask, out=out, kernel=strict_product)
    good = np.empty((4, 3, 3))
    assert NumpyOps.chunk_blocks(q, k, lam, mask, out=good, kernel=strict_product) is good
    expected = np.tril(q @ k.mT, -1) * (1 if mask is None else mask) + lam[..., None] * np.eye(3)
    rows, cols = np.tril_indices(3)  # the blocks' only defined entries
    np.testing.assert_allclose(good[:, rows, cols], expected[:, rows, cols], rtol=1e-12)


def column_copy(q_in, blocks, k_out, decay, v, h0, y, states, col_start, col_stop):
    """A stand-in for the state pass that copies its columns of v to y and h0 to the states."""
    y[..., col_start:col_stop] = v[..., col_start:col_stop]
    states[..., col_start:col_stop] = h0[:, None, :, col_start:col_stop]


@pytest.mark.parametrize(("ops", "wrap"), BACKENDS, ids=IDS)
@pytest.mark.parametrize("workers", ["1", "2", "5"])
@pytest.mark.parametrize(("count", "m"), [(1, 64), (2, 33), (3, 16), (1, 7)])
def test_substitution_pass_lanes_cover_every_column(monkeypatch, ops, wrap, workers, count, m):
    monkeypatch.setenv("DPLR_NUM_THREADS", workers)
    monkeypatch.setattr(tuning, "LOOP_MIN_FLOPS", 0.0)
    nc, c, d = 3, 4, 2
    rng = np.random.default_rng(0)
    v = rng.standard_normal((count, nc, c, m))
    h0 = rng.standard_normal((count, d, m))
    zeros = np.zeros((count, nc, c, d))
    blocks = np.zeros((count, nc, c, c))
    for keep in (False, True):
        y, states = ops.substitution_pass(
            *map(wrap, (zeros, blocks, zeros)), None, wrap(v), wrap(h0), keep, kernel=column_copy
        )
        np.testing.assert_array_equal(as_numpy(y), v)
        assert as_numpy(states).shape == (count, nc + 1 if keep else 1, d, m)
        np.testing.assert_array_equal(as_numpy(states), np.broadcast_to(h0[:, None], states.shape))


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_off_cpu_branches_match_the_compiled_ones(monkeypatch, rng):
    # The pure-torch branches (what non-CPU tensors run), forced on CPU tensors.
    from dplr.core import _jit

    L = np.tril(rng.standard_normal((3, 5, 5))) + 3 * np.eye(5)
    B = rng.standard_normal((3, 5, 2))
    q, k = rng.standard_normal((2, 3, 5, 4))
    lam = 1.0 + rng.random((3, 5))
    compiled = TorchOps.solve_lower_blocks(
        *map(torch.from_numpy, (L, B)), kernel=_jit.solve_lower_stack
    )
    blocks = TorchOps.chunk_blocks(
        *map(torch.from_numpy, (q, k, lam)), None, kernel=_jit.form_chunk_blocks
    )
    monkeypatch.setattr(backend, "_all_cpu", lambda *xs: False)
    pure = TorchOps.solve_lower_blocks(*map(torch.from_numpy, (L, B)), kernel=None)
    np.testing.assert_allclose(pure.numpy(), compiled.numpy(), rtol=1e-12)
    np.testing.assert_allclose(pure.numpy(), np.linalg.solve(L, B), rtol=1e-12)
    pure_blocks = TorchOps.chunk_blocks(*map(torch.from_numpy, (q, k, lam)), None, kernel=None)
    rows, cols = np.tril_indices(5)
    expected = np.tril(q @ k.mT, -1) + lam[..., None] * np.eye(5)
    for got in (blocks, pure_blocks):
        np.testing.assert_allclose(got.numpy()[:, rows, cols], expected[:, rows, cols], rtol=1e-12)
