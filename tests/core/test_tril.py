"""LowRankTril (NumPy) against dense references built here from the definition.

References.  Dense matrices come from :func:`dplr.reference.tril_dense` (the
definition ``diag(lam) + tril(Q K^T ⊙ D, -1)``, tested on its own) or from the
entry-by-entry loop below, never from the code under test; ``to_dense`` is
itself tested entry by entry.

Tolerances.  With ``|T|_r = |Q||K|^T ⊙ D + |diag|`` (the scale of the rounding
errors in forming and applying T) and ``gamma = (n + d) eps``:

* product: the chunked product sums the terms of the dense one in another
  order, ``|Y - T V| <= 2 gamma |T|_r |V|`` entrywise (Higham, Accuracy and
  Stability, 3.5);
* solve and inverse: the chunked substitution has a componentwise backward
  error ``|dT| <= gamma |T|_r``, so the forward error is bounded through
  Skeel's condition number, ``|X - X*| <= gamma |T^-1| |T|_r |X*|``
  (Higham 7.2), measured in the max norm against the float64 solution of the
  same inputs.  Measured over 300 random float32 draws the error stayed below
  0.12 of this bound.  Zeros as the answer fail whenever the bound is below 1;
  the checks require it below ``MEANINGFUL`` = 1e-2 (property draws above it,
  about 0.3% of float32 draws, whose float32 answer has almost no correct
  digit, are excluded with ``assume``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dplr
from conftest import delta_family, eps, rel_err
from dplr.reference import tril_dense

#: Largest solve error bound at which the answer is checked (see the docstring).
MEANINGFUL = 1e-2


def dense_loop(q, k, diag, log_decay):
    """T from its definition, entry by entry (the reference for to_dense)."""
    n = q.shape[0]
    T = np.zeros((n, n))
    for i in range(n):
        T[i, i] = 1.0 if diag is None else diag[i]
        for j in range(i):
            decay = 1.0 if log_decay is None else np.exp(np.sum(log_decay[j + 1 : i + 1]))
            T[i, j] = q[i] @ k[j] * decay
    return T


def random_operands(rng, batch, n, d, dtype, with_diag, with_decay):
    q = rng.standard_normal((*batch, n, d)) / np.sqrt(d)
    k = rng.standard_normal((*batch, n, d)) / np.sqrt(d)
    diag = rng.uniform(1.0, 2.0, (*batch, n)) * rng.choice([-1, 1], (*batch, n))
    log_decay = -rng.uniform(0.0, 0.5, (*batch, n))
    return (
        q.astype(dtype),
        k.astype(dtype),
        diag.astype(dtype) if with_diag else None,
        log_decay.astype(dtype) if with_decay else None,
    )


def dense_pair(ops64, transpose):
    """T and ``|T|_r = |Q||K|^T ⊙ D + |diag|`` (or their transposes) in float64."""
    q, k, diag, ld = ops64
    dense = tril_dense(q, k, diag, ld)
    absolute = tril_dense(np.abs(q), np.abs(k), None if diag is None else np.abs(diag), ld)
    if transpose:
        return np.swapaxes(dense, -1, -2), np.swapaxes(absolute, -1, -2)
    return dense, absolute


def as64(*xs):
    return [None if x is None else np.asarray(x, np.float64) for x in xs]


def triangular_solve(dense, b, lower):
    """``dense^-1 b`` by SciPy's substitution, matrix by matrix over the batch.

    The references are triangular solves, not LU: LU with pivoting on an
    ill-conditioned triangle has an error of its own of the size of the bounds
    below (measured: 3e-12 against 5e-16 for substitution, n = 82, d = 3).
    """
    b = np.broadcast_to(b, (*dense.shape[:-2], *b.shape[-2:]))
    out = np.empty(b.shape)
    for i in np.ndindex(dense.shape[:-2]):
        out[i] = sl.solve_triangular(dense[i], b[i], lower=lower)
    return out


def solve_bound(dense, absolute, x_ref, n, d, dtype, lower=True):
    """``(n + d) eps max(|T^-1| |T|_r |X|) / max|X|``: the solve's relative error bound."""
    inverse = triangular_solve(dense, np.eye(dense.shape[-1]), lower)
    skeel = np.abs(inverse) @ absolute @ np.abs(x_ref)
    return (n + d) * eps(dtype) * skeel.max() / max(np.abs(x_ref).max(), np.finfo(float).tiny)


def check_product(T, ops64, v, transpose, chunk, dtype):
    dense, absolute = dense_pair(ops64, transpose)
    y = T.matmul(v, transpose=transpose, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == np.broadcast_shapes((*T.shape[:-1], 1), v.shape)
    n, d = T.shape[-1], T.rank
    bound = 2 * (n + d) * eps(dtype) * (absolute @ np.abs(v.astype(float)))
    assert (np.abs(y - dense @ v.astype(float)) <= bound).all()


def check_solve(T, ops64, v, transpose, chunk, dtype, assume_meaningful=False):
    dense, absolute = dense_pair(ops64, transpose)
    n, d = T.shape[-1], T.rank
    batch = np.broadcast_shapes(T.shape[:-2], v.shape[:-2])
    dense = np.broadcast_to(dense, (*batch, n, n))
    ref = triangular_solve(dense, v.astype(float), lower=not transpose)
    bound = solve_bound(dense, absolute, ref, n, d, dtype, lower=not transpose)
    if assume_meaningful:
        assume(bound <= MEANINGFUL)
    assert bound <= MEANINGFUL, f"the case is too ill-conditioned for {np.dtype(dtype)}"
    x = T.solve(v, transpose=transpose, chunk_size=chunk)
    assert x.dtype == dtype
    assert rel_err(x, ref) <= bound


def check_inverse(T, ops64, chunk, dtype):
    dense, absolute = dense_pair(ops64, False)
    n, d = T.shape[-1], T.rank
    ref = triangular_solve(dense, np.eye(n), lower=True)
    bound = solve_bound(dense, absolute, ref, n, d, dtype)
    assert bound <= MEANINGFUL
    inv = T.inv(chunk_size=chunk)
    assert inv.dtype == dtype
    assert rel_err(inv, ref) <= bound


# --------------------------------------------------------------------- to_dense
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 4),
    batch=st.sampled_from([(), (2,), (2, 1)]),
    with_diag=st.booleans(),
    with_decay=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_to_dense_matches_definition_entry_by_entry(n, d, batch, with_diag, with_decay, seed):
    rng = np.random.default_rng(seed)
    q, k, diag, ld = random_operands(rng, batch, n, d, np.float64, with_diag, with_decay)
    dense = dplr.LowRankTril(q, k, diag, ld).to_dense()
    assert dense.shape == (*batch, n, n)
    for idx in np.ndindex(*batch):
        pick = [None if x is None else x[idx] for x in (diag, ld)]
        ref = dense_loop(q[idx], k[idx], *pick)
        np.testing.assert_allclose(dense[idx], ref, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------- grid of shapes and dtypes
SHAPES = [  # (batch of q, batch of k, batch of v, n, d, chunk)
    ((), (), (), 1, 3, None),
    ((), (), (), 5, 2, 16),  # n < chunk
    ((), (), (), 37, 4, 8),  # chunk does not divide n
    ((3,), (3,), (3,), 64, 5, 16),
    ((2, 4), (4,), (1,), 50, 1, 7),  # broadcasting, d = 1
    ((), (), (2, 1), 6, 9, 4),  # d > n, batch only in v
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_grid_against_dense(rng, shape, with_decay, dtype):
    bq, bk, bv, n, d, chunk = shape
    q, _, diag, ld = random_operands(rng, bq, n, d, dtype, True, with_decay)
    _, k, _, _ = random_operands(rng, bk, n, d, dtype, False, False)
    v = rng.standard_normal((*bv, n, 3)).astype(dtype)
    T = dplr.LowRankTril(q, k, diag, ld)
    ops64 = as64(q, k, diag, ld)
    for transpose in (False, True):
        check_product(T, ops64, v, transpose, chunk, dtype)
        check_solve(T, ops64, v, transpose, chunk, dtype)
    # inv and slogdet
    check_inverse(T, ops64, chunk, dtype)
    dense = tril_dense(*ops64)
    sign, logabs = T.slogdet()
    ref_sign, ref_logabs = np.linalg.slogdet(dense)
    np.testing.assert_array_equal(sign, np.broadcast_to(ref_sign, sign.shape))
    np.testing.assert_allclose(logabs, ref_logabs, rtol=n * eps(dtype), atol=n * eps(dtype))


def test_vector_right_hand_side(rng):
    q, k, diag, ld = random_operands(rng, (), 20, 3, np.float64, True, True)
    T = dplr.LowRankTril(q, k, diag, ld)
    b = rng.standard_normal(20)
    x = T.solve(b)
    assert x.shape == (20,)
    dense = tril_dense(q, k, diag, ld)
    np.testing.assert_allclose(x, triangular_solve(dense, b, lower=True), rtol=1e-12, atol=1e-12)
    assert (T @ b).shape == (20,)
    np.testing.assert_allclose(T @ b, dense @ b, rtol=1e-12, atol=1e-12)


def test_integers_promote_to_float64():
    T = dplr.LowRankTril(np.ones((4, 1), int), np.ones((4, 1), int), diag=np.full(4, 2))
    assert T.dtype == np.float64
    assert T.solve(np.arange(4)).dtype == np.float64


def test_float16_computes_in_float32_and_returns_float16(rng):
    q, k, _ = delta_family(rng, (), 30, 4, np.float16)
    T = dplr.LowRankTril(q, k)
    x = T.solve(np.ones((30, 2), np.float16))
    assert x.dtype == np.float16
    q64, k64 = as64(q, k)  # the float16 inputs, exactly
    dense, absolute = dense_pair((q64, k64, None, None), False)
    ref = triangular_solve(dense, np.ones((30, 2)), lower=True)
    # computed in float32, then rounded once to float16 (half an ulp)
    bound = 0.5 * eps(np.float16) + solve_bound(dense, absolute, ref, 30, 4, np.float32)
    assert rel_err(x, ref) <= bound


# -------------------------------------------------------- the seed's two checks
def test_seed_checks_inverse_and_solve():
    """n = 1000, d = 100, c = 200: ``Y T = I`` for the inverse, ``T Y = V`` for the solve."""
    rng = np.random.default_rng(0)
    n, d, c = 1000, 100, 200
    q = rng.standard_normal((n, d)) / d**0.5
    k = rng.standard_normal((n, d)) / d**0.5
    v = rng.standard_normal((n, d)) / d**0.5
    T = dplr.LowRankTril(q, k)
    dense = tril_dense(q, k)
    assert np.allclose(T.inv(chunk_size=c) @ dense, np.eye(n))
    assert np.allclose(dense @ T.solve(v, chunk_size=c), v)


# ----------------------------------------------------------- property tests
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 90),
    d=st.integers(1, 6),
    chunk=st.one_of(st.none(), st.integers(1, 70)),
    batch=st.sampled_from([(), (2,), (1, 3)]),
    with_diag=st.booleans(),
    with_decay=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_against_dense(n, d, chunk, batch, with_diag, with_decay, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, diag, ld = random_operands(rng, batch, n, d, dtype, with_diag, with_decay)
    v = rng.standard_normal((n, 2)).astype(dtype)
    T = dplr.LowRankTril(q, k, diag, ld)
    ops64 = as64(q, k, diag, ld)
    transpose = bool(rng.integers(2))
    check_product(T, ops64, v, transpose, chunk, dtype)
    check_solve(T, ops64, v, transpose, chunk, dtype, assume_meaningful=True)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 80), chunk=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_property_chunk_size_does_not_change_the_answer(n, chunk, seed):
    rng = np.random.default_rng(seed)
    q, k, ld = delta_family(rng, (2,), n, 3, decay=True)
    T = dplr.LowRankTril(q, k, log_decay=ld)
    v = rng.standard_normal((2, n, 4))
    np.testing.assert_allclose(T.solve(v, chunk_size=chunk), T.solve(v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.inv(chunk_size=chunk), T.inv(), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_property_solve_inverts_matmul(n, seed):
    rng = np.random.default_rng(seed)
    q, k, diag, ld = random_operands(rng, (), n, 3, np.float64, True, True)
    T = dplr.LowRankTril(q, k, diag, ld)
    v = rng.standard_normal((n, 3))
    for transpose in (False, True):
        y = T.matmul(T.solve(v, transpose=transpose), transpose=transpose)
        np.testing.assert_allclose(y, v, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------- ill-conditioned
def test_ill_conditioned_tolerance_scales_with_condition_number(rng):
    """diag near 0.01 and large q, k: cond(T) ~ 1e8; the error stays within the Skeel bound."""
    n, d = 60, 3
    q = 3.0 * rng.standard_normal((n, d))
    k = 3.0 * rng.standard_normal((n, d))
    diag = rng.uniform(0.01, 0.02, n)
    T = dplr.LowRankTril(q, k, diag)
    dense, absolute = dense_pair(as64(q, k, diag, None), False)
    cond = np.linalg.cond(dense, p=np.inf)
    assert cond > 1e6  # the case is really ill-conditioned
    v = rng.standard_normal((n, 2))
    x = T.solve(v, chunk_size=16)
    ref = sl.solve_triangular(dense, v, lower=True)
    bound = solve_bound(dense, absolute, ref, n, d, np.float64)
    assert bound < 1e-6  # Skeel's condition number stays far below cond(T)
    assert rel_err(x, ref) <= bound
    # the componentwise backward error is small however large cond is
    residual = np.abs(dense @ x - v)
    assert (residual <= (n + d) * eps(np.float64) * (absolute @ np.abs(x))).all()


# ----------------------------------------------------------- long sequences
def test_long_decay_does_not_overflow():
    """n = 100000, log_decay = -0.1 per step: exp(G) alone would underflow to 0 and its
    reciprocal overflow; the chunk-relative mask keeps every entry finite."""
    rng = np.random.default_rng(5)
    n, d = 100_000, 4
    q, k, _ = delta_family(rng, (), n, d)
    ld = np.full(n, -0.1)
    T = dplr.LowRankTril(q, k, log_decay=ld)
    v = rng.standard_normal((n, 2))
    y, x, xt = T @ v, T.solve(v), T.solve(v, transpose=True)
    for arr in (y, x, xt):
        assert np.isfinite(arr).all()
    # T is lower triangular: the leading rows of T^-1 v only see the leading block,
    # the trailing rows of T^-T v only the trailing block.
    m = 1500
    head = tril_dense(q[:m], k[:m], log_decay=ld[:m])
    tail = tril_dense(q[-m:], k[-m:], log_decay=ld[-m:])
    np.testing.assert_allclose(
        x[:m], triangular_solve(head, v[:m], lower=True), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        xt[-m:], triangular_solve(tail.T, v[-m:], lower=False), rtol=1e-10, atol=1e-12
    )
    assert rel_err(T.matmul(x), v) < 1e-12


# ----------------------------------------------------------------- bad input
def _ops(n=5, d=2):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)), rng.standard_normal((n, d))


@pytest.mark.parametrize("batch", [(), (3,)])
def test_empty_matrix_gives_empty_results(batch):
    """n = 0, as in NumPy and SciPy: empty products, solves and inverses; det = 1."""
    empty = np.ones((*batch, 0, 2))
    T = dplr.LowRankTril(empty, empty, diag=np.ones(0), log_decay=np.zeros(0))
    assert T.shape == (*batch, 0, 0)
    for transpose in (False, True):
        assert T.solve(np.ones((0, 4)), transpose=transpose).shape == (*batch, 0, 4)
        assert T.matmul(np.ones((0, 4)), transpose=transpose).shape == (*batch, 0, 4)
    assert T.solve(np.ones(0)).shape == (*batch, 0)  # a vector right-hand side
    assert T.inv().shape == T.to_dense().shape == (*batch, 0, 0)
    sign, logabs = T.slogdet()
    ref_sign, ref_logabs = np.linalg.slogdet(np.ones((*batch, 0, 0)))
    np.testing.assert_array_equal(sign, ref_sign)
    np.testing.assert_array_equal(logabs, ref_logabs)
    assert dplr.tril_solve(empty, empty, np.ones((0, 1))).shape == (*batch, 0, 1)
    assert dplr.tril_inv(empty, empty).shape == (*batch, 0, 0)


def test_first_log_decay_does_not_enter_the_matrix(rng):
    """log_decay[0] multiplies nothing in T: any value there gives the same T and solve."""
    q, k, diag, ld = random_operands(rng, (2,), 40, 3, np.float64, True, True)
    v = rng.standard_normal((2, 40, 2))
    ref = triangular_solve(dense_loop(q[0], k[0], diag[0], ld[0]), v[0], lower=True)
    for first in (0.0, 5.0, 800.0, -np.inf):
        changed = ld.copy()
        changed[..., 0] = first
        T = dplr.LowRankTril(q, k, diag, changed)
        np.testing.assert_allclose(T.solve(v, chunk_size=8)[0], ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(T.inv(chunk_size=8)[0] @ v[0], ref, rtol=1e-12, atol=1e-12)


def minus_inf_operands(rng, batch, n, d):
    """Operands whose log decay is -inf (a decay factor of exactly 0) at a few rows."""
    q, k, diag, ld = random_operands(rng, batch, n, d, np.float64, True, True)
    for row in (1, n // 2, n - 1):
        ld[..., row] = -np.inf
    return q, k, diag, ld


def dense_by_loop(q, k, diag, ld):
    """Batched :func:`dense_loop` (the decay as exp of a sum: exp(-inf) = 0 exactly)."""
    out = np.empty((*q.shape[:-1], q.shape[-2]))
    for idx in np.ndindex(*q.shape[:-2]):
        out[idx] = dense_loop(q[idx], k[idx], diag[idx], ld[idx])
    return out


@pytest.mark.parametrize("chunk", [None, 4, 7])
def test_minus_inf_decay_is_an_exact_zero(rng, chunk):
    """Rows after a -inf decay do not see rows before it: T is block diagonal there."""
    q, k, diag, ld = minus_inf_operands(rng, (2,), 23, 3)
    dense = dense_by_loop(q, k, diag, ld)
    assert dense[0, 12, 10] == 0.0 and dense[0, 12, 11] != 0.0  # the reset at row 11
    T = dplr.LowRankTril(q, k, diag, ld)
    v = rng.standard_normal((2, 23, 2))
    for transpose in (False, True):
        a = np.swapaxes(dense, -1, -2) if transpose else dense
        np.testing.assert_allclose(
            T.matmul(v, transpose=transpose, chunk_size=chunk), a @ v, rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            T.solve(v, transpose=transpose, chunk_size=chunk),
            triangular_solve(a, v, lower=not transpose),
            rtol=1e-11,
            atol=1e-12,
        )
    np.testing.assert_allclose(
        T.inv(chunk_size=chunk),
        triangular_solve(dense, np.eye(23), lower=True),
        rtol=1e-11,
        atol=1e-12,
    )
    np.testing.assert_array_equal(T.to_dense() == 0, dense == 0)


def test_singular_diagonal_raises_singular_matrix_error():
    q, k = _ops()
    T = dplr.LowRankTril(q, k, diag=np.array([[1.0, 2, 0, 1, 1]]))
    assert issubclass(dplr.SingularMatrixError, np.linalg.LinAlgError)
    with pytest.raises(dplr.SingularMatrixError, match=r"diag\[0, 2\] == 0"):
        T.solve(np.ones(5))
    with pytest.raises(dplr.SingularMatrixError):
        T.inv()
    sign, logabs = T.slogdet()
    assert sign[0] == 0 and logabs[0] == -np.inf
    assert np.isfinite(T @ np.ones(5)).all()  # the product is fine


def test_inputs_are_never_modified(rng):
    q, k, diag, ld = random_operands(rng, (2,), 30, 3, np.float64, True, True)
    v = rng.standard_normal((2, 30, 4))
    arrays = (q, k, diag, ld, v)
    copies = [a.copy() for a in arrays]
    T = dplr.LowRankTril(q, k, diag, ld)
    T.solve(v), T.solve(v, transpose=True), T @ v, T.matmul(v, transpose=True), T.inv()
    T.to_dense(), T.slogdet()
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_non_contiguous_inputs(rng):
    q, k, diag, ld = random_operands(rng, (), 40, 6, np.float64, True, True)
    v = np.asfortranarray(rng.standard_normal((40, 3)))
    T = dplr.LowRankTril(q[:, ::2], k[:, 1::2], diag[::1], ld)
    ref = triangular_solve(tril_dense(q[:, ::2], k[:, 1::2], diag, ld), v, lower=True)
    np.testing.assert_allclose(T.solve(v), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.solve(v[::-1][::-1]), ref, rtol=1e-12, atol=1e-12)


def test_repr_and_properties():
    T = dplr.LowRankTril(np.ones((2, 7, 3)), np.ones((7, 3)), log_decay=-np.ones(7))
    assert T.shape == (2, 7, 7) and T.rank == 3 and T.dtype == np.float64
    assert "shape=(2, 7, 7)" in repr(T) and "decay" in repr(T)
    np.testing.assert_array_equal(T.diag, np.ones((2, 7)))  # broadcast with q


def test_results_do_not_share_the_reused_scratch_memory(rng):
    # Intermediates live in per-thread buffers kept between calls
    # (dplr._runtime.workspace): a result must never be a view of them, so later
    # calls of other sizes must leave earlier results as they were.
    problems = [random_operands(rng, (2,), n, 4, np.float64, True, True) for n in (70, 300, 9)]
    rhs = [rng.standard_normal((2, p[0].shape[-2], 3)) for p in problems]
    results = [
        dplr.LowRankTril(*p).solve(v, chunk_size=8) for p, v in zip(problems, rhs, strict=True)
    ]
    kept = [x.copy() for x in results]
    for p, v in zip(problems[::-1], rhs[::-1], strict=True):
        dplr.LowRankTril(*p).solve(v, chunk_size=16, transpose=True)
    for x, c in zip(results, kept, strict=True):
        np.testing.assert_array_equal(x, c)


def test_concurrent_solves_from_several_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    problems = [random_operands(rng, (), 200 + 37 * i, 5, np.float64, True, True) for i in range(6)]
    rhs = [rng.standard_normal((p[0].shape[-2], 2)) for p in problems]
    refs = [
        triangular_solve(tril_dense(*p), v, lower=True) for p, v in zip(problems, rhs, strict=True)
    ]

    def solve(i: int) -> np.ndarray:
        return dplr.LowRankTril(*problems[i]).solve(rhs[i], chunk_size=16)

    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            for x, ref in zip(pool.map(solve, range(6)), refs, strict=True):
                np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("m", [16, 33, 64])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_right_hand_sides_split_between_threads(monkeypatch, rng, threads, m, batch, dtype):
    # With fewer batch entries than threads the state pass gives each thread
    # its own columns of Y and of the state (m >= 32): every split must give
    # the dense answer, and the states those of a plain recurrence.  (Split
    # even though the problem is too small to be worth it.)
    from dplr._runtime import tuning
    from dplr._runtime.backend import NumpyOps
    from dplr.core import _kernels

    monkeypatch.setenv("DPLR_NUM_THREADS", threads)
    monkeypatch.setattr(tuning, "LOOP_MIN_FLOPS", 0.0)
    q, k, diag, ld = random_operands(rng, batch, 75, 4, dtype, True, True)
    v = rng.standard_normal((*batch, 75, m)).astype(dtype)
    T = dplr.LowRankTril(q, k, diag, ld)
    for transpose in (False, True):
        check_solve(T, as64(q, k, diag, ld), v, transpose, 16, dtype)
    # states entering each chunk and after the last, from an initial state h0
    h0 = rng.standard_normal((*batch, 4, m))
    q64, k64, diag64, ld64 = as64(q, k, diag, ld)
    y, states = _kernels.solve(
        NumpyOps, q64, k64, diag64, ld64, v.astype(float), h0=h0, chunk_size=16, return_states=True
    )
    g = np.cumsum(ld64, -1)
    state = h0.copy()
    for i in range(75):  # the state after row i, row by row
        state = np.exp(ld64[..., i, None, None]) * state + k64[..., i, :, None] * y[..., i, None, :]
        if (i + 1) % 16 == 0 or i == 74:
            np.testing.assert_allclose(states[..., -(-(i + 1) // 16), :, :], state, rtol=1e-10)
    ref = triangular_solve(
        tril_dense(q64, k64, diag64, ld64),
        v.astype(float) - np.exp(g)[..., None] * (q64 @ h0),
        lower=True,
    )
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)


def test_empty_cache_frees_the_scratch_buffers_and_the_cap_is_kept(rng, monkeypatch):
    from dplr._runtime import workspace as _workspace

    q, k, diag, ld = random_operands(rng, (), 200, 4, np.float64, True, False)
    v = rng.standard_normal((200, 3))
    T = dplr.LowRankTril(q, k, diag, ld)
    ref = T.solve(v)
    assert _workspace._buffers()  # the solve kept its intermediates
    dplr.empty_cache()
    assert not _workspace._buffers()
    np.testing.assert_array_equal(T.solve(v), ref)  # and allocates them again
    dplr.empty_cache()
    monkeypatch.setattr(_workspace, "MAX_CACHED_BYTES", 1024)
    np.testing.assert_array_equal(T.solve(v), ref)
    assert not _workspace._buffers()  # requests above the cap are not kept


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_strict_lower_product_matches_numpy(rng, dtype):
    # The tiled kernel behind the diagonal blocks, on every tail shape of its
    # groups of 4 rows, against float64 products: within the standard bound
    # for a dot product of length K in the array's precision,
    # |error| <= K eps (|a| |k|^T) (float32 accumulates in float32).
    from dplr.core._jit import _strict_lower_product

    eps = np.finfo(dtype).eps

    for m_rows, depth in [(1, 1), (3, 2), (4, 64), (9, 33), (32, 64)]:
        a = rng.standard_normal((m_rows, depth)).astype(dtype)
        k = rng.standard_normal((m_rows, depth)).astype(dtype)
        lower = np.full((m_rows, m_rows), np.nan, dtype)
        _strict_lower_product(a, k, lower)
        assert lower.dtype == dtype
        below = np.tril_indices(m_rows, -1)  # all the kernel promises to write
        a64, k64 = a.astype(float), k.astype(float)
        bound = depth * eps * (np.abs(a64) @ np.abs(k64).T)
        assert (np.abs(lower - a64 @ k64.T)[below] <= bound[below]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [4, 16])  # row by row (d <= 8), chunked
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_solve_checks_v_in_its_pass(monkeypatch, dtype, d, bad):
    # A checked solve finds a NaN or Inf of v in the pass that reads v: in
    # either column lane, in the zero-padded last chunk, in any batch entry.
    # The error is the one of the separate check (naming v, not chained), the
    # caller's v is untouched, and a finite v gives the unchecked result.
    from dplr._runtime import tuning

    monkeypatch.setenv("DPLR_NUM_THREADS", "2")
    monkeypatch.setattr(tuning, "LOOP_MIN_FLOPS", 0.0)  # two lanes of columns
    rng = np.random.default_rng(3)
    q, k, _ = delta_family(rng, (2,), 70, d, dtype)  # 70 rows: chunks of 32, 32 and 6
    T = dplr.LowRankTril(q, k)
    v = rng.standard_normal((2, 70, 40)).astype(dtype)
    big = np.full_like(v, np.finfo(dtype).max / 2)  # huge but finite: no error
    T.solve(big, chunk_size=32)
    want = T.solve(v, chunk_size=32, check_finite=False)
    np.testing.assert_array_equal(T.solve(v, chunk_size=32), want)
    for where in [(0, 0, 0), (1, 69, 39), (0, 33, 19), (1, 64, 20)]:
        w = v.copy()
        w[where] = bad
        given = w.copy()
        with pytest.raises(ValueError, match="'v' contains NaN or Inf") as info:
            T.solve(w, chunk_size=32)
        assert info.value.__context__ is None
        np.testing.assert_array_equal(w, given)
    assert T.solve(np.ones((70, 0), dtype)).shape == (2, 70, 0)  # nothing to read: no error
