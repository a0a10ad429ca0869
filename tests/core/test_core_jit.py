"""dplr.core._jit: the compiled loops of the core, called directly on NumPy arrays.

(Named test_core_jit.py: pytest needs test files with distinct names, and
tests/_runtime/test_jit.py tests dplr._runtime.jit.)

References are written here: SciPy's ``solve_triangular`` per block, the
blocks of T from ``q k^T`` in NumPy, and the chunk recurrence (forward and
reverse) and the row-by-row recurrence as plain Python loops over dense
NumPy steps.  Bound:
every case is a few products of length <= d plus substitutions with unit-ish
diagonals (cond <= ~10), so the error is a small multiple of
``(c + d) eps``; 20 (c + d + n) eps fails any wrong term (O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from conftest import eps, rel_err
from dplr.core import _jit

DTYPES = [np.float32, np.float64]


def _tol(dtype, *sizes: int) -> float:
    return 20 * sum(sizes) * eps(dtype)


def _lower_blocks(rng, shape, c):
    """Unit-dominant lower blocks (cond ~ 1) with garbage above the diagonal (never read)."""
    blocks = np.tril(rng.standard_normal((*shape, c, c)), -1) * (0.5 / np.sqrt(c))
    blocks += np.eye(c) * rng.uniform(1.0, 2.0, (*shape, c, 1))
    return blocks + np.triu(rng.standard_normal((*shape, c, c)) * 1e3, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 4, 7, 13])  # the loop works in panels of 4 rows
def test_solve_lower_stack_is_the_triangular_solve(dtype, c):
    rng = np.random.default_rng(0)
    L = _lower_blocks(rng, (5,), c).astype(dtype)
    B = rng.standard_normal((5, c, 3)).astype(dtype)
    X = np.empty_like(B)
    _jit.solve_lower_stack(L, B, X)
    for b in range(5):
        want = sl.solve_triangular(np.tril(L[b]).astype(float), B[b], lower=True)
        assert rel_err(X[b], want) <= _tol(dtype, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("c", [3, 8, 11])  # the product works in groups of 4 rows
def test_form_chunk_blocks_is_diag_plus_strict_masked_product(dtype, masked, c):
    rng = np.random.default_rng(1)
    nb, d = 4, 6
    q, k = (rng.standard_normal((nb, c, d)).astype(dtype) for _ in range(2))
    lam = rng.uniform(1.0, 2.0, (nb, c)).astype(dtype)
    mask = np.tril(rng.uniform(0.0, 1.0, (nb, c, c)), -1).astype(dtype)
    out = np.full((nb, c, c), np.nan, dtype)  # above the diagonal: undefined, never read
    _jit.form_chunk_blocks(q, k, lam, mask if masked else np.empty((0, c, c), dtype), out)
    want = np.tril(q.astype(float) @ np.swapaxes(k, -1, -2), -1)
    want = want * mask if masked else want
    want += lam[..., None] * np.eye(c)
    low = np.tril(np.ones((c, c), dtype=bool))
    assert rel_err(out[:, low], want[:, low]) <= _tol(dtype, d)


def _pass_inputs(rng, count, nc, c, d, m, per_channel):
    """Operands of ``substitution_pass`` (float64): q_in, blocks, k_out, decay, v, h0."""
    q_in, k_out = (0.3 * rng.standard_normal((count, nc, c, d)) for _ in range(2))
    blocks = _lower_blocks(rng, (count, nc), c)
    decay = rng.uniform(0.5, 1.0, (count, nc, d if per_channel else 1))
    v = rng.standard_normal((count, nc, c, m))
    h0 = rng.standard_normal((count, d, m))
    return q_in, blocks, k_out, decay, v, h0


def _pass_reference(q_in, blocks, k_out, decay, v, h0):
    """The chunk recurrence of the docstring, one chunk at a time (float64)."""
    count, nc = v.shape[:2]
    y = np.empty(v.shape)
    states = np.empty((count, nc + 1, *h0.shape[1:]))
    for b in range(count):
        h = h0[b].astype(float)
        states[b, 0] = h
        for j in range(nc):
            rhs = v[b, j] - q_in[b, j] @ h
            y[b, j] = sl.solve_triangular(np.tril(blocks[b, j]), rhs, lower=True)
            h = decay[b, j][:, None] * h + k_out[b, j].T @ y[b, j]
            states[b, j + 1] = h
    return y, states


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_substitution_pass_is_the_chunk_recurrence(dtype, per_channel, keep):
    count, nc, c, d, m = 2, 3, 5, 6, 7
    inputs = _pass_inputs(np.random.default_rng(2), count, nc, c, d, m, per_channel)
    args = [x.astype(dtype) for x in inputs]
    y_want, s_want = _pass_reference(*args)
    y = np.full((count, nc, c, m), np.nan, dtype)
    states = np.full((count, nc + 1 if keep else 1, d, m), np.nan, dtype)
    # Two column ranges, as two threads would run them: each writes only its own.
    _jit.substitution_pass(*args, y, states, 0, 3)
    assert np.isnan(y[..., 3:]).all()
    _jit.substitution_pass(*args, y, states, 3, m)
    tol = _tol(dtype, c, d, nc)
    assert rel_err(y, y_want) <= tol
    assert rel_err(states, s_want if keep else s_want[:, -1:]) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_substitution_pass_resets_the_state_at_a_zero_decay(dtype, per_channel):
    # A decay of exactly 0 (a log decay of -inf) drops the state: with one
    # decay per chunk the state update is a gemm with beta = 0, which never
    # reads the old state.  Against the recurrence (0 * H + k_out^T Y), with
    # a state 1e6 times larger than the rest so that a state kept by mistake
    # would show far above the bound.
    count, nc, c, d, m = 1, 4, 6, 5, 9
    q_in, blocks, k_out, decay, v, h0 = _pass_inputs(
        np.random.default_rng(5), count, nc, c, d, m, per_channel
    )
    decay[:, 1] = 0.0
    h0 *= 1e6
    args = [x.astype(dtype) for x in (q_in, blocks, k_out, decay, v, h0)]
    y_want, s_want = _pass_reference(*args)
    y = np.full(v.shape, np.nan, dtype)
    states = np.full((count, nc + 1, d, m), np.nan, dtype)
    _jit.substitution_pass(*args, y, states, 0, m)
    tol = _tol(dtype, c, d, nc)
    # after the reset (chunks 2, 3 and the states entering them) nothing of h0 is left
    assert rel_err(y[:, 2:], y_want[:, 2:]) <= tol
    assert rel_err(states[:, 2:], s_want[:, 2:]) <= tol
    assert rel_err(y, y_want) <= tol  # y of chunks 0 and 1 carries h0's scale


def _recurrence_reference(q, k, lam, decay, v, h0, solve):
    """Row by row with the state H (d x m), float64, as the docstring writes it."""
    y = np.empty(v.shape)
    hn = np.empty(h0.shape)
    for b in range(q.shape[0]):
        h = h0[b].astype(float)
        for i in range(q.shape[1]):
            if decay.shape[2]:
                h = decay[b, i][:, None] * h  # (1,) per row or (d,) per channel
            if solve:
                y[b, i] = (v[b, i] - q[b, i] @ h) / lam[b, i]
            else:
                y[b, i] = lam[b, i] * v[b, i] + q[b, i] @ h
            h = h + np.outer(k[b, i], y[b, i] if solve else v[b, i])
        hn[b] = h
    return y, hn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solve", [False, True])
@pytest.mark.parametrize("decay_width", [0, 1, 3])  # none, per row, per channel (d = 3)
def test_recurrence_is_the_row_by_row_definition(dtype, solve, decay_width):
    rng = np.random.default_rng(3)
    count, n, d, m = 2, 9, 3, 4
    q, k = (0.4 * rng.standard_normal((count, n, d)) for _ in range(2))
    lam = rng.uniform(1.0, 2.0, (count, n))
    decay = rng.uniform(0.5, 1.0, (count, n, decay_width))
    if decay_width:
        decay[0, 4] = 0.0  # a factor of exactly 0 (a -inf log decay) resets the state
    v = rng.standard_normal((count, n, m))
    h0 = rng.standard_normal((count, d, m))
    args = [x.astype(dtype) for x in (q, k, lam, decay, v, h0)]
    y_want, hn_want = _recurrence_reference(*args, solve)
    y = np.full(v.shape, np.nan, dtype)
    hn = np.full(h0.shape, np.nan, dtype)
    _jit.recurrence(*args, y, hn, solve, 0, 1)
    _jit.recurrence(*args, y, hn, solve, 1, m)
    tol = _tol(dtype, n, d)
    assert rel_err(y, y_want) <= tol and rel_err(hn, hn_want) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solve", [False, True])
def test_recurrence_with_a_unit_diagonal(dtype, solve):
    """lam of shape (B, 0) is the unit diagonal: the reference with lam = 1."""
    rng = np.random.default_rng(4)
    count, n, d, m = 2, 11, 4, 3
    q, k = (0.4 * rng.standard_normal((count, n, d)) for _ in range(2))
    decay = rng.uniform(0.5, 1.0, (count, n, 1))
    v = rng.standard_normal((count, n, m))
    h0 = rng.standard_normal((count, d, m))
    q, k, decay, v, h0 = (x.astype(dtype) for x in (q, k, decay, v, h0))
    y_want, hn_want = _recurrence_reference(q, k, np.ones((count, n)), decay, v, h0, solve)
    y, hn = np.empty(v.shape, dtype), np.empty(h0.shape, dtype)
    assert _jit.recurrence(q, k, np.empty((count, 0), dtype), decay, v, h0, y, hn, solve, 0, m)
    tol = _tol(dtype, n, d)
    assert rel_err(y, y_want) <= tol and rel_err(hn, hn_want) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solve", [False, True])
def test_recurrence_reports_every_non_finite_entry_it_reads(dtype, solve):
    """The return value is False exactly when an entry of q, k, lam, decay or of
    the lane's columns of v is NaN or +-Inf: at the first, a middle and the last
    row, in every argument.  Finite extremes (the largest float, the smallest
    subnormal) pass."""
    rng = np.random.default_rng(5)
    count, n, d, m = 2, 9, 3, 4
    args = {
        "q": 0.4 * rng.standard_normal((count, n, d)),
        "k": 0.4 * rng.standard_normal((count, n, d)),
        "lam": rng.uniform(1.0, 2.0, (count, n)),
        "decay": rng.uniform(0.5, 1.0, (count, n, d)),
        "v": rng.standard_normal((count, n, m)),
    }
    args = {name: x.astype(dtype) for name, x in args.items()}
    h0 = np.zeros((count, d, m), dtype)

    def finite(a, cols=(0, m)):
        y, hn = np.empty((count, n, m), dtype), np.empty((count, d, m), dtype)
        return _jit.recurrence(a["q"], a["k"], a["lam"], a["decay"], a["v"], h0, y, hn,
                               solve, *cols)  # fmt: skip

    assert finite(args)
    tiny, big = np.finfo(dtype).smallest_subnormal, np.finfo(dtype).max
    for name in args:
        for row in (0, n // 2, n - 1):
            for value, ok in ((np.nan, False), (np.inf, False), (-np.inf, False), (tiny, True)):
                if name == "decay" and value == -np.inf:
                    continue  # a factor is exp(log decay): never -inf
                changed = {key: x.copy() for key, x in args.items()}
                changed[name][1, row, ...] = value
                assert finite(changed) == ok, (name, row, value)
        if name == "v":  # a lane reads only its columns of v
            changed = {key: x.copy() for key, x in args.items()}
            changed["v"][0, 2, 3] = np.nan
            assert finite(changed, (0, 3)) and not finite(changed, (3, m))
        else:  # the largest finite value is no NaN or Inf, even where the results overflow
            changed = {key: x.copy() for key, x in args.items()}
            changed[name][0, 1, ...] = big if name != "decay" else 1.0
            assert finite(changed), name


def _adjoint_reference(k_out, w, decay, dy_local, dh_add, dh_last):
    """The reverse recurrence of the docstring, chunk by chunk from the last (float64)."""
    count, nc = dy_local.shape[:2]
    dy = np.empty(dy_local.shape)
    dh = np.empty(dh_add.shape)
    dh0 = np.empty(dh_last.shape)
    for b in range(count):
        grad = dh_last[b].astype(float)
        for j in reversed(range(nc)):
            dh[b, j] = grad
            dy[b, j] = dy_local[b, j] + k_out[b, j] @ grad
            grad = decay[b, j][:, None] * grad + dh_add[b, j] - w[b, j].T @ dy[b, j]
        dh0[b] = grad
    return dy, dh, dh0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_adjoint_pass_is_the_reverse_chunk_recurrence(dtype, per_channel):
    rng = np.random.default_rng(4)
    count, nc, c, d, m = 2, 4, 5, 6, 7
    k_out, w = (0.3 * rng.standard_normal((count, nc, c, d)) for _ in range(2))
    decay = rng.uniform(0.5, 1.0, (count, nc, d if per_channel else 1))
    dy_local = rng.standard_normal((count, nc, c, m))
    dh_add = rng.standard_normal((count, nc, d, m))
    dh_last = rng.standard_normal((count, d, m))
    args = [x.astype(dtype) for x in (k_out, w, decay, dy_local, dh_add, dh_last)]
    want = _adjoint_reference(*args)
    got = [np.full(x.shape, np.nan, dtype) for x in want]
    # Two column ranges, as two threads would run them.
    _jit.adjoint_pass(*args, *got, 0, 3)
    assert np.isnan(got[0][..., 3:]).all()
    _jit.adjoint_pass(*args, *got, 3, m)
    tol = _tol(dtype, c, d, nc)
    for name, g, ref in zip(("dy", "dh", "dh0"), got, want, strict=True):
        assert rel_err(g, ref) <= tol, name
