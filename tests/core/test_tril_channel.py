"""LowRankTril with per-channel decay, (..., n, d), and exact resets (-inf decay).

The reference is built here from the definition,
``T_ij = sum_c q_ic k_jc exp(log_decay[j+1, c] + ... + log_decay[i, c])`` for
i > j, as running sums of the log decays (a sum holding -inf is -inf, whose
exp is an exact 0), then solved with :func:`scipy.linalg.solve_triangular`.
Tolerances are the standard bounds: a product is within ``(n + d) eps`` of
``|T| |V|``; a solve within ``(n + d) eps cond(T)`` relative (with small
constant factors for the chunked summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
from hypothesis import given, settings
from hypothesis import strategies as st

import dplr
from conftest import eps, rel_err


def segment_decay(log_decay):
    """(n, d) -> (n, n, d): exp of the sum of log_decay[j+1..i] for i > j, else 0."""
    n, d = log_decay.shape
    seg = np.full((n, n, d), -np.inf)
    rows = np.arange(n)
    for off in range(1, n):
        i = rows[off:]
        prev = np.zeros((n - off, d)) if off == 1 else seg[i, i - off + 1]
        seg[i, i - off] = prev + log_decay[i - off + 1]
    return np.exp(seg)


def dense_reference(q, k, diag, log_decay):
    """Dense T (..., n, n) in float64 from the definition; log_decay (..., n) or (..., n, d)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n, d = q.shape[-2:]
    ld = np.asarray(log_decay, np.float64)
    if ld.ndim < 2 or ld.shape[-2:] != (n, d):
        ld = np.repeat(ld[..., None], d, -1)
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], ld.shape[:-2])
    qb, kb, lb = (np.broadcast_to(x, (*batch, n, d)) for x in (q, k, ld))
    out = np.empty((*batch, n, n))
    for idx in np.ndindex(*batch):
        out[idx] = np.einsum("ic,jc,ijc->ij", qb[idx], kb[idx], segment_decay(lb[idx]))
    lam = np.ones(n) if diag is None else np.asarray(diag, np.float64)
    return out + lam[..., :, None] * np.eye(n)


def decay_family(rng, shape, mode, dtype=np.float64):
    """Per-channel log decays (..., n, d) of several kinds."""
    if mode == "mild":
        ld = -rng.uniform(0.0, 0.5, shape)
    elif mode == "strong":  # -5 per row in every channel (the steepest gate in use)
        ld = np.full(shape, -5.0)
    elif mode == "mixed":  # some channels -5, the others mild
        ld = -rng.uniform(0.0, 0.3, shape)
        ld[..., ::2] = -5.0
    elif mode == "extreme":  # steeper than a sub-block of one chunk can span in float64
        ld = -rng.uniform(100.0, 300.0, shape)
    elif mode == "resets":  # -inf in scattered entries and in a whole channel
        ld = -rng.uniform(0.0, 1.0, shape)
        ld[rng.random(shape) < 0.1] = -np.inf
        ld[..., 0] = -np.inf
    else:
        raise ValueError(mode)
    return ld.astype(dtype)


def operands(rng, batch, n, d, dtype):
    k = rng.standard_normal((*batch, n, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.standard_normal((*batch, n, d)) / np.sqrt(d)
    diag = rng.uniform(1.0, 2.0, (*batch, n)) * rng.choice([-1, 1], (*batch, n))
    return q.astype(dtype), k.astype(dtype), diag.astype(dtype)


def check_all(q, k, diag, ld, v, chunk, dtype):
    """Product, both solves, inverse and slogdet of LowRankTril against the dense reference."""
    T = dplr.LowRankTril(q, k, diag, ld, check_finite=False)
    dense = dense_reference(q, k, diag, ld)
    absT = np.abs(dense_reference(np.abs(q), np.abs(k), np.abs(diag), ld))
    n, d = q.shape[-2:]
    cond = np.linalg.cond(dense.reshape(-1, n, n), p=np.inf).max()
    v64 = v.astype(np.float64)
    for tr in (False, True):
        A, absA = (dense.swapaxes(-1, -2), absT.swapaxes(-1, -2)) if tr else (dense, absT)
        y = T.matmul(v, transpose=tr, chunk_size=chunk)
        assert y.dtype == dtype and np.isfinite(y).all()
        scale = (absA @ np.abs(v64)).max()
        assert np.abs(y - A @ v64).max() <= 2 * (n + d) * eps(dtype) * scale
        x = T.solve(v, transpose=tr, chunk_size=chunk)
        vb = np.broadcast_to(v64, x.shape)
        ref = np.empty(x.shape)
        for idx in np.ndindex(*x.shape[:-2]):
            ref[idx] = sl.solve_triangular(A[idx], vb[idx], lower=not tr)
        assert x.dtype == dtype and np.isfinite(x).all()
        assert rel_err(x, ref) <= 4 * (n + d) * eps(dtype) * cond
    inv = T.inv(chunk_size=chunk)
    eye = np.broadcast_to(np.eye(n), dense.shape)
    ref_inv = np.empty(dense.shape)
    for idx in np.ndindex(*dense.shape[:-2]):
        ref_inv[idx] = sl.solve_triangular(dense[idx], eye[idx], lower=True)
    assert rel_err(inv, ref_inv) <= 4 * (n + d) * eps(dtype) * cond
    # the mask is exp of a cumulative sum in the working precision: (n + d) eps
    assert rel_err(T.to_dense(), dense) <= 2 * (n + d) * eps(dtype)
    sign, logabs = T.slogdet()
    ref_sign, ref_logabs = np.linalg.slogdet(dense)
    np.testing.assert_array_equal(sign, ref_sign)
    np.testing.assert_allclose(logabs, ref_logabs, rtol=n * eps(dtype), atol=n * eps(dtype))


CASES = [  # (batch, n, d, chunk)
    ((), 1, 3, None),  # n = 1
    ((), 5, 2, 16),  # n < chunk
    ((), 37, 4, 8),  # chunk does not divide n
    ((2,), 64, 5, 16),  # chunk divides n, batch
    ((), 40, 3, 40),  # one chunk
]


# float32 holds no exp(-100) next to unit entries: "extreme" runs in float64 only.
MODES = [(m, t) for m in ("mild", "strong", "mixed", "resets") for t in (np.float32, np.float64)]


@pytest.mark.parametrize(("mode", "dtype"), [*MODES, ("extreme", np.float64)])
@pytest.mark.parametrize("case", CASES)
def test_per_channel_against_dense(rng, case, mode, dtype):
    batch, n, d, chunk = case
    q, k, diag = operands(rng, batch, n, d, dtype)
    ld = decay_family(rng, (*batch, n, d), mode, dtype)
    v = rng.standard_normal((*batch, n, 3)).astype(dtype)
    check_all(q, k, diag, ld, v, chunk, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scalar_decay_with_resets_against_dense(rng, dtype):
    """-inf in a (..., n) log decay: an exact zero factor, finite results everywhere."""
    q, k, diag = operands(rng, (2,), 45, 3, dtype)
    ld = -rng.uniform(0.0, 1.0, (2, 45))
    ld[0, [0, 7, 8, 30]] = -np.inf  # the first row, two in a row, one later
    ld[1, 16] = -np.inf  # a chunk boundary
    v = rng.standard_normal((2, 45, 2)).astype(dtype)
    for chunk in (8, 16, 64):
        check_all(q, k, diag, ld.astype(dtype), v, chunk, dtype)


def test_a_reset_splits_the_matrix():
    """Rows after a full reset do not see rows before it: T is block diagonal there."""
    rng = np.random.default_rng(3)
    q, k, diag = operands(rng, (), 30, 4, np.float64)
    ld = -rng.uniform(0.0, 0.5, (30, 4))
    ld[12] = -np.inf
    T = dplr.LowRankTril(q, k, diag, ld, check_finite=False).to_dense()
    assert np.all(T[12:, :12] == 0.0)
    v = rng.standard_normal((30, 2))
    x = dplr.tril_solve(q, k, v, diag, ld, chunk_size=8, check_finite=False)
    tail = dplr.tril_solve(q[12:], k[12:], v[12:], diag[12:], ld[12:], check_finite=False)
    np.testing.assert_allclose(x[12:], tail, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["strong", "mixed"])
def test_float32_at_minus_five_is_exact_to_float32_precision(mode):
    """float32 at log decay -5 per row: every pair across 16 rows spans e^-80; the
    anchored blocks keep the error at a few float32 epsilons at every chunk size
    (bound: 8 (c + d) eps cond, c the chunk size)."""
    rng = np.random.default_rng(7)
    n, d = 512, 8
    q, k, _ = operands(rng, (), n, d, np.float64)
    q = rng.uniform(0.0, 1.0, (n, 1)) * k  # the delta-rule family: cond(T) stays small
    ld = decay_family(rng, (n, d), mode)
    v = rng.standard_normal((n, 4))
    dense = dense_reference(q, k, None, ld)
    cond = np.linalg.cond(dense, p=np.inf)
    x_ref, y_ref = sl.solve_triangular(dense, v, lower=True), dense @ v
    f32 = [x.astype(np.float32) for x in (q, k, v, ld)]
    for chunk in (16, 32, 64, 128):
        x = dplr.tril_solve(f32[0], f32[1], f32[2], None, f32[3], chunk_size=chunk)
        y = dplr.tril_matmul(f32[0], f32[1], f32[2], None, f32[3], chunk_size=chunk)
        bound = 8 * (chunk + d) * eps(np.float32)
        assert rel_err(x, x_ref) <= bound * cond
        assert rel_err(y, y_ref) <= bound


def test_log_decay_batch_broadcasts(rng):
    q, k, diag = operands(rng, (2, 3), 20, 3, np.float64)
    ld = decay_family(rng, (3, 20, 3), "mixed")  # batch (3,) against (2, 3)
    v = rng.standard_normal((20, 2))
    check_all(q, k, diag, ld, v, 8, np.float64)


def test_shape_rules_and_errors():
    q = np.ones((4, 4)) / 4
    # d == n: a (4, 4) decay with as many dimensions as q is per channel ...
    ld = np.zeros((4, 4))
    ld[:, 0] = -1.0
    T = dplr.LowRankTril(q, q, log_decay=ld)
    np.testing.assert_allclose(T.to_dense(), dense_reference(q, q, None, ld), rtol=1e-15)
    # ... and with one more dimension it is a batch of four (4,) decays.
    assert dplr.LowRankTril(q, q, log_decay=np.zeros((3, 4, 4))).shape == (3, 4, 4)
    assert dplr.LowRankTril(q[:, :2], q[:, :2], log_decay=np.zeros((4, 4))).shape == (4, 4, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\) or \(\.\.\., 4, 3\)"):
        dplr.LowRankTril(np.ones((4, 3)), np.ones((4, 3)), log_decay=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="<= 0"):
        dplr.LowRankTril(np.ones((4, 3)), np.ones((4, 3)), log_decay=np.full((4, 3), 0.5))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 50),
    d=st.integers(1, 5),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
    batch=st.sampled_from([(), (2,)]),
    mode=st.sampled_from(["mild", "strong", "mixed", "resets"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_against_dense(n, d, chunk, batch, mode, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, diag = operands(rng, batch, n, d, dtype)
    ld = decay_family(rng, (*batch, n, d), mode, dtype)
    v = rng.standard_normal((n, 2)).astype(dtype)
    check_all(q, k, diag, ld, v, chunk, dtype)
