"""dplr.distributed.dask: the batched Cholesky modifications on a cluster of processes.

References: the in-memory batched call (bit-identical: the same method and
kernels run on every entry), and ``numpy.linalg.cholesky`` of the modified
matrices formed here.  Bound against numpy: the factors are of
``x x^T / N + I`` (condition number < 10), so a backward-stable update is
within ``100 N eps`` of the refactorisation; a wrong rotation is O(1) off.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask.array as da  # noqa: E402

import dplr  # noqa: E402
from dplr.distributed import dask as dd  # noqa: E402

N = 32
TOL = 100 * N * np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def client():
    """Two worker processes with one thread each (processes x threads = 2 cores)."""
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        env=dd.worker_env(1), silence_logs=logging.ERROR,
    )  # fmt: skip
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def spd_factors(rng, batch: int, n: int = N):
    x = rng.standard_normal((batch, n, n))
    a = x @ x.mT / n + np.eye(n)
    return a, np.linalg.cholesky(a)


def test_worker_environment(client):
    seen = client.run(lambda: __import__("os").environ.get("DPLR_NUM_THREADS"))
    assert sorted(seen.values()) == ["1", "1"]


def factor_block(x):
    return np.linalg.cholesky(x @ x.mT / x.shape[-1] + np.eye(x.shape[-1]))


def test_update_of_ten_thousand_factors_is_bit_identical(client):
    # The factors are made and kept on the workers, as a user's would be.
    x = da.random.default_rng(0).standard_normal((10_000, N, N), chunks=(2_500, N, N))
    lazy_low = x.map_blocks(factor_block).persist()
    low = lazy_low.compute()
    u = np.random.default_rng(1).standard_normal((10_000, N, 1))
    lazy = dd.cholesky_update(lazy_low, u)
    assert lazy.numblocks[0] == 4
    out = lazy.compute()
    assert np.array_equal(out, dplr.cholesky_update(low, u))
    assert np.array_equal(lazy_low.compute(), low)  # the inputs are untouched
    a = low[:100] @ low[:100].mT
    ref = np.linalg.cholesky(a + u[:100] @ u[:100].mT)
    assert np.abs(out[:100] - ref).max() <= TOL * np.abs(ref).max()


def test_downdate_insert_delete_are_bit_identical(client):
    rng = np.random.default_rng(1)
    a, low = spd_factors(rng, 600)
    u = 0.1 * rng.standard_normal((600, N, 3))
    w = rng.uniform(0.5, 1.5, (600, 3))
    lazy = da.from_array(low, chunks=(150, N, N))
    out = dd.cholesky_downdate(lazy, u, w).compute()
    assert np.array_equal(out, dplr.cholesky_downdate(low, u, w))
    ref = np.linalg.cholesky(a - (u * w[:, None, :]) @ u.mT)
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()

    big_a, big = spd_factors(rng, 600, N + 2)
    keep = np.r_[0:5, 7 : N + 2]
    small = np.linalg.cholesky(big_a[:, keep][:, :, keep])
    cols = big_a[:, :, 5:7]
    out = dd.cholesky_insert(da.from_array(small, chunks=(200, N, N)), 5, cols).compute()
    assert np.array_equal(out, dplr.cholesky_insert(small, 5, cols))
    assert np.abs(out - big).max() <= TOL * np.abs(big).max()

    out = dd.cholesky_delete(da.from_array(big, chunks=(200, N + 2, N + 2)), 5, 2).compute()
    assert np.array_equal(out, dplr.cholesky_delete(big, 5, 2))
    assert np.abs(out - small).max() <= TOL * np.abs(small).max()


def indefinite_downdate(rng, batch: int, bad: list[int]):
    """Factors and vectors whose downdate fails exactly at ``bad``: ``||L^-1 u|| = 2`` there."""
    _, low = spd_factors(rng, batch)
    p = rng.standard_normal((batch, N, 1))
    p *= (0.5 / np.linalg.norm(p, axis=1, keepdims=True)) * np.where(
        np.isin(np.arange(batch), bad), 4.0, 1.0
    )[:, None, None]
    return low, low @ p  # u = L p: A - u u^T = L (I - p p^T) L^T, PD iff ||p|| < 1


def test_flag_returns_the_mask_of_every_block(client):
    rng = np.random.default_rng(2)
    bad = [3, 250, 251, 999]
    low, u = indefinite_downdate(rng, 1_000, bad)
    before = low.copy()
    new, ok = dd.cholesky_downdate(da.from_array(low, chunks=(250, N, N)), u, errors="flag")
    assert ok.chunks == ((250, 250, 250, 250),)
    new, ok = da.compute(new, ok)
    assert np.flatnonzero(~ok).tolist() == bad
    assert np.array_equal(new[bad], low[bad])  # failed entries hold the input factor
    assert np.array_equal(new, dplr.cholesky_downdate(low, u, errors="flag")[0])
    assert np.array_equal(low, before)


def test_raise_names_every_failed_entry_on_the_client(client):
    rng = np.random.default_rng(3)
    bad = [7, 260, 990]
    low, u = indefinite_downdate(rng, 1_000, bad)
    before = (low.copy(), u.copy())
    lazy = dd.cholesky_downdate(da.from_array(low, chunks=(250, N, N)), u)
    with pytest.raises(dplr.NotPositiveDefiniteError) as info:
        lazy.compute()
    assert info.value.batch_indices == ((7,), (260,), (990,))
    assert "260" in str(info.value)
    assert np.array_equal(low, before[0]) and np.array_equal(u, before[1])


def test_two_batch_axes_and_broadcast_vector():
    """Batch (6, 5) in 2 x 2 blocks, one u for every factor, local scheduler."""
    rng = np.random.default_rng(4)
    a, low = spd_factors(rng, 30, 8)
    low, a = low.reshape(6, 5, 8, 8), a.reshape(6, 5, 8, 8)
    u = rng.standard_normal(8)
    lazy = da.from_array(low, chunks=(3, 3, 8, 8))
    out = dd.cholesky_update(lazy, u).compute(scheduler="synchronous")
    assert np.array_equal(out, dplr.cholesky_update(low, np.broadcast_to(u[:, None], (6, 5, 8, 1))))
    ref = np.linalg.cholesky(a + np.outer(u, u))
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()
    bad_u = np.zeros((6, 5, 8, 1))
    bad_u[4, 1, :, 0] = 3 * low[4, 1, :, 0]  # u = 3 L e_1: ||L^-1 u|| = 3 > 1
    with pytest.raises(dplr.NotPositiveDefiniteError) as info:
        dd.cholesky_downdate(lazy, bad_u).compute(scheduler="synchronous")
    assert info.value.batch_indices == ((4, 1),)


def test_bad_arguments_raise_at_once():
    low = da.from_array(np.stack([np.eye(3)] * 4), chunks=(2, 3, 3))
    with pytest.raises(ValueError, match="'errors'"):
        dd.cholesky_update(low, np.ones(3), errors="ignore")
    with pytest.raises(ValueError, match="'index'"):
        dd.cholesky_delete(low, 3, 1)
    with pytest.raises(ValueError, match="'threads'"):
        dd.worker_env(0)
