"""The process-wide, reference-counted BLAS thread limit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import dplr
from dplr._runtime import blas, tuning

#: Thread count set around each test: differs from 1 and from the machine's
#: default, so that a leaked limit or a leaked "original" both show.
ORIGINAL = 3


def counts() -> list[int]:
    """The thread counts of the BLAS libraries dplr limits, as threadpoolctl reports them."""
    paths = set(blas.controlled_libraries())
    return [i["num_threads"] for i in threadpool_info() if i["filepath"] in paths]


@pytest.fixture(autouse=True)
def known_counts():
    blas.controlled_libraries()  # loads SciPy's BLAS before the limit is set
    with threadpool_limits(limits=ORIGINAL, user_api="blas"):
        assert counts() == [ORIGINAL] * len(counts())
        yield
    assert not blas._requests and blas._original is None  # nobody left inside


def test_numpy_and_scipy_blas_are_both_controlled():
    import scipy.linalg  # noqa: F401

    loaded = {i["filepath"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert loaded <= set(blas.controlled_libraries())
    assert len(blas.controlled_libraries()) >= 1


def test_limit_holds_inside_and_is_restored_after():
    with blas.single_threaded_blas():
        assert set(counts()) == {1}
        with blas.blas_threads(None):  # no limit of its own: the outer one stays
            assert set(counts()) == {1}
        assert set(counts()) == {1}
    assert set(counts()) == {ORIGINAL}
    with blas.blas_threads(2):
        assert set(counts()) == {2}
        with blas.blas_threads(1):
            assert set(counts()) == {1}
        assert set(counts()) == {2}
    with blas.blas_threads(50):  # never more than the count in force before
        assert set(counts()) == {ORIGINAL}
    assert set(counts()) == {ORIGINAL}


def test_restored_when_the_body_raises():
    with pytest.raises(KeyError), blas.single_threaded_blas():
        raise KeyError
    assert set(counts()) == {ORIGINAL}


def test_overlapping_threads_first_out_does_not_lift_the_other_and_last_out_restores():
    # A enters, B enters, A leaves (B must still be limited), B leaves
    # (the counts from before A must come back).  A record-and-restore
    # context manager fails both: it lifts B's limit, then leaves 1 behind.
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def first():
        with blas.single_threaded_blas():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with blas.single_threaded_blas():
            b_in.set()
            a_out.wait(10)
            seen["inside after A left"] = set(counts())

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    assert seen == {"inside after A left": {1}}
    assert set(counts()) == {ORIGINAL}


def test_four_threads_calling_dplr_leave_the_counts_as_they_found_them(monkeypatch):
    # From this order on the blocked update runs at the library's count, while
    # the solves in the other threads hold BLAS at one thread.
    monkeypatch.setattr(tuning, "THREADED_BLAS_MIN_ORDER", 200)
    rng = np.random.default_rng(0)
    q = rng.random((2048, 32)) * 0.01
    v = np.ones((2048, 16))
    a = rng.standard_normal((400, 400))
    L = np.linalg.cholesky(a @ a.T / 400 + np.eye(400))
    U = rng.standard_normal((400, 16)) * 0.1
    limited_inside: list[bool] = []
    stop = time.monotonic() + 1.0

    def work(i: int) -> None:
        while time.monotonic() < stop:
            if i % 2:
                dplr.tril_solve(q, q, v)
            else:
                dplr.cholesky_update(L, U, method="blocked")
            with blas.single_threaded_blas():
                limited_inside.append(set(counts()) == {1})

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert limited_inside and all(limited_inside)
    assert set(counts()) == {ORIGINAL}
