"""dplr's thread pool, the split of work into lanes, and the pool after ``fork``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dplr._runtime import threads, tuning


def covered(parts: list[slice], length: int) -> list[int]:
    return [i for s in parts for i in range(length)[s]]


@pytest.mark.parametrize("length", [0, 1, 5, 16, 17, 1000])
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64])
def test_split_covers_every_index_once_in_order(length, parts):
    got = threads.split(length, parts)
    assert covered(got, length) == list(range(length))
    assert len(got) <= parts
    assert all(s.stop > s.start for s in got)
    sizes = [s.stop - s.start for s in got]
    assert not sizes or max(sizes) - min(sizes) <= 1  # near-equal


@pytest.mark.parametrize("workers", ["1", "2", "3", "8"])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("columns", [1, 15, 16, 33, 64, 200])
def test_lanes_cover_every_entry_and_column_once(monkeypatch, workers, count, columns):
    monkeypatch.setenv("DPLR_NUM_THREADS", workers)
    lanes = threads.lanes(count, columns, flops=tuning.LOOP_MIN_FLOPS)
    seen = [
        (b, col) for rows, cols in lanes for b in range(count)[rows] for col in range(columns)[cols]
    ]
    assert sorted(seen) == [(b, col) for b in range(count) for col in range(columns)]
    assert len(lanes) <= max(int(workers), 1)
    for _, cols in lanes:  # a column range is cut only into ranges of useful width
        assert cols.stop - cols.start >= min(columns, tuning.MIN_LANE_COLUMNS)


def test_lanes_split_columns_only_with_fewer_entries_than_threads(monkeypatch):
    monkeypatch.setenv("DPLR_NUM_THREADS", "4")
    big = tuning.LOOP_MIN_FLOPS

    def column_ranges(count: int) -> set[tuple[int, int]]:
        return {(cols.start, cols.stop) for _, cols in threads.lanes(count, 64, big)}

    assert column_ranges(4) == {(0, 64)}
    assert len(column_ranges(1)) == 4
    assert len(column_ranges(2)) == 2
    # below the threshold everything runs as one lane on the calling thread
    assert threads.lanes(3, 64, big / 2) == [(slice(0, 3), slice(0, 64))]


def test_stack_parts_split_only_work_worth_it(monkeypatch):
    monkeypatch.setenv("DPLR_NUM_THREADS", "3")
    assert threads.stack_parts(10, flops=99.0, min_flops=100.0) == [slice(0, 10)]
    parts = threads.stack_parts(10, flops=100.0, min_flops=100.0)
    assert len(parts) == 3 and covered(parts, 10) == list(range(10))


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 1000, 10_000])
def test_batch_parts(monkeypatch, count):
    monkeypatch.setenv("DPLR_NUM_THREADS", "2")
    parts = threads.batch_parts(count)
    assert covered(parts, count) == list(range(count))
    if count < tuning.RANK1_PARALLEL_BATCH:
        assert len(parts) <= 1
    else:
        assert 1 < len(parts) <= tuning.PARTS_PER_THREAD * 2
        assert min(s.stop - s.start for s in parts) >= tuning.RANK1_MIN_FACTORS_PER_PART


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("1", 1), ("0", None), ("x", None)])
def test_num_workers_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("DPLR_NUM_THREADS", value)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.num_workers() == (expected or usable)


def test_run_all_keeps_order_and_uses_the_pool_for_several_items():
    names: dict[int, str] = {}
    out = threads.run_all(
        lambda i: names.setdefault(i, threading.current_thread().name) and i * i, range(6)
    )
    assert out == [0, 1, 4, 9, 16, 25]
    # the calling thread and the pool's threads take the items
    caller = threading.current_thread().name
    assert all(name == caller or name.startswith("dplr") for name in names.values())


def test_run_all_runs_at_most_num_workers_items_at_once(monkeypatch):
    monkeypatch.setattr(threads, "num_workers", lambda: 2)
    running, most = [0], [0]
    lock = threading.Lock()

    def work(_):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1

    threads.run_all(work, range(8))
    assert most[0] <= 2


def test_run_all_nested_in_its_own_items_finishes(monkeypatch):
    """Items that call run_all themselves (every pool thread busy) do not wait forever."""
    monkeypatch.setattr(threads, "num_workers", lambda: 2)
    result: list = []

    def outer():
        result.append(threads.run_all(lambda i: sum(threads.run_all(lambda j: i * j, range(4))),
                                      range(6)))  # fmt: skip

    runner = threading.Thread(target=outer, daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "nested run_all calls waited on each other"
    assert result == [[6 * i for i in range(6)]]


def test_run_all_waits_for_every_item_before_raising(monkeypatch):
    """An error is raised only once no item is running (none left writing into buffers)."""
    monkeypatch.setattr(threads, "num_workers", lambda: 2)
    running = [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
        try:
            time.sleep(0.01 if i == 0 else 0.05)
            if i == 0:
                raise RuntimeError("first item failed")
        finally:
            with lock:
                running[0] -= 1

    with pytest.raises(RuntimeError, match="first item failed"):
        threads.run_all(work, range(3))
    assert running[0] == 0


# A child started with fork after the parent used the pool (and while another
# parent thread is inside dplr, holding the BLAS limit and the pool) must run
# the same calls to the end, with the results of the parent.  Before the
# runtime reset its state after fork, the child's solve waited forever for
# the parent's pool threads.
_FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, threading, time
    import numpy as np, dplr
    from threadpoolctl import threadpool_info

    def blas_counts():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    rng = np.random.default_rng(0)
    q = rng.random((4096, 64)) * 0.01
    v = np.ones((4096, 64))
    a = rng.standard_normal((1100, 1100))  # large enough for the threaded LAPACK update
    L = np.linalg.cholesky(a @ a.T / 1100 + np.eye(1100))
    U = rng.standard_normal((1100, 8)) * 0.1
    Ls = np.broadcast_to(np.eye(16) * 2, (128, 16, 16)).copy()
    us = rng.standard_normal((128, 16, 1)) * 0.1
    qd, kd = rng.standard_normal((2, 1, 1, 32, 128)) / 12  # a decode step, 32 heads
    vd, bd = rng.standard_normal((1, 1, 32, 128)), rng.random((1, 1, 32))
    s0 = rng.standard_normal((1, 32, 128, 128)) / 12
    calls = {
        "solve": lambda: dplr.tril_solve(q, q, v),
        "blocked": lambda: dplr.cholesky_update(L, U, method="blocked"),
        "rank1 batch": lambda: dplr.cholesky_update(Ls, us, method="rank1"),
        "decode": lambda: dplr.delta_rule(qd, kd, vd, bd, initial_state=s0)[0],
    }
    expected = {name: f() for name, f in calls.items()}  # the parent's pool is now running
    original = blas_counts()

    def child(name):
        ok = np.array_equal(calls[name](), expected[name])
        ok = ok and blas_counts() == original  # no limit left over from the parent's threads
        os._exit(0 if ok else 3)

    stop = threading.Event()
    def busy():  # a parent thread inside dplr while the children are forked
        while not stop.is_set():
            calls["solve"]()
    if sys.argv[1] == "busy":
        threading.Thread(target=busy, daemon=True).start()
        time.sleep(0.2)
    for name in calls:
        p = mp.get_context("fork").Process(target=child, args=(name,))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            print(name, "hung")
        else:
            print(name, "exit", p.exitcode)
    stop.set()
    """
)


@pytest.mark.parametrize("parent", ["idle", "busy"])
def test_forked_child_runs_solve_and_updates_to_the_end(parent):
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, parent],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DPLR_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == [
        "solve exit 0",
        "blocked exit 0",
        "rank1 batch exit 0",
        "decode exit 0",
    ], proc.stdout + proc.stderr
