"""Failing calls of every public function, from several threads at once and in a forked
child: each raises its error and leaves the caller's arrays as they were (also a batched
downdate that fails with ``overwrite=True``)."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import dplr


def _failing_calls(seed: int) -> list[tuple[str, type[Exception], object, list[np.ndarray]]]:
    """(name, error, call, every array of these calls: none may change)."""
    rng = np.random.default_rng(seed)
    n, d, m = 300, 8, 4  # n above a chunk: the chunked paths run
    q, k = rng.standard_normal((2, n, d)) * 0.1, rng.standard_normal((2, n, d)) * 0.1
    lam, v = 1.0 + rng.random((2, n)), rng.standard_normal((2, n, m))
    v_nan = v.copy()
    v_nan[1, n - 7, 2] = np.nan
    lam_zero = lam.copy()
    lam_zero[1, 123] = 0.0
    a = rng.standard_normal((3, 40, 40))
    factor = np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) + 40 * np.eye(40))
    too_big = rng.standard_normal((3, 40, 2)) * 10.0  # every entry loses definiteness
    T, H, K = 40, 2, 16
    rq, rk, rv = (rng.standard_normal((1, T, H, K)) for _ in range(3))
    beta, g = rng.random((1, T, H)), -rng.random((1, T, H))
    g_bad = g.copy()
    g_bad[0, 17, 1] = 0.5  # a positive log decay
    rk_inf, rq1 = rk.copy(), rq[:, :1].copy()
    rk_inf[0, 30, 0, 3] = np.inf
    rq1[0, 0, 1, 5] = np.nan
    u_nan = rng.standard_normal((3, 40, 2))
    u_nan[2, 5, 1] = np.nan  # the last batch entry only
    g_kda = -rng.random((1, 1, H, K))
    calls = [
        ("tril_solve, NaN in v", ValueError, lambda: dplr.tril_solve(q, k, v_nan, lam)),
        ("tril_matmul, NaN in v", ValueError, lambda: dplr.tril_matmul(q, k, v_nan, lam)),
        ("tril_solve, singular", dplr.SingularMatrixError,
         lambda: dplr.tril_solve(q, k, v, lam_zero)),
        ("tril_inv, singular", dplr.SingularMatrixError, lambda: dplr.tril_inv(q, k, lam_zero)),
        ("cholesky_downdate, overwrite", dplr.NotPositiveDefiniteError,
         lambda: dplr.cholesky_downdate(factor, too_big, overwrite=True)),
        ("cholesky_update, NaN, overwrite", ValueError,
         lambda: dplr.cholesky_update(factor, u_nan, overwrite=True)),
        ("gated_delta_rule, positive g", ValueError,
         lambda: dplr.gated_delta_rule(rq, rk, rv, g_bad, beta)),
        ("delta_rule, Inf in k", ValueError, lambda: dplr.delta_rule(rq, rk_inf, rv, beta)),
        ("kda decode, NaN in q", ValueError,
         lambda: dplr.kda(rq1, rk[:, :1], rv[:, :1], g_kda, beta[:, :1])),
    ]  # fmt: skip
    arrays = [q, k, lam, v, v_nan, lam_zero, factor, too_big, u_nan, rq, rk, rv, beta, g_bad,
              rk_inf, rq1, g_kda]  # fmt: skip
    return [(name, error, call, arrays) for name, error, call in calls]


def _run_all_failing(seed: int) -> list[str]:
    """The names of the calls that did not raise their error or changed an argument."""
    problems = []
    for name, error, call, arrays in _failing_calls(seed):
        before = [x.copy() for x in arrays]
        try:
            call()
            problems.append(f"{name}: no error")
        except error:
            pass
        except Exception as exc:  # reported, not swallowed
            problems.append(f"{name}: {type(exc).__name__} {exc}")
        same = (np.array_equal(x, y, equal_nan=True) for x, y in zip(arrays, before, strict=True))
        if not all(same):
            problems.append(f"{name}: an argument was modified")
    return problems


def test_every_failing_call_raises_and_leaves_its_arguments():
    assert _run_all_failing(0) == []


def test_failing_calls_from_several_threads_at_once():
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(_run_all_failing, range(8)))
    assert all(r == [] for r in results), results


def _child() -> None:
    os._exit(0 if _run_all_failing(3) == [] else 7)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_failing_calls_in_a_forked_child_after_the_parent_ran_them():
    assert _run_all_failing(1) == []  # the parent's pools, caches and buffers are warm
    p = mp.get_context("fork").Process(target=_child)
    p.start()
    p.join(120)
    assert p.exitcode == 0
