"""dplr's worker threads: the pool, the split of work into lanes, a fresh pool after fork.

The compiled loops release the GIL and NumPy releases it inside BLAS, so
plain Python threads run independent pieces of work on all cores at once.
Nothing here knows what the pieces compute: callers pass functions in.

After ``os.fork`` only the forking thread exists in the child, so a pool
inherited from the parent would queue work that no thread ever takes (the
child waited forever).  :func:`_reset_after_fork` drops it in the child; the
next call there starts a pool of its own.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from . import tuning


def num_workers() -> int:
    """Threads dplr uses: ``DPLR_NUM_THREADS``, else the CPUs this process may use."""
    configured = os.environ.get("DPLR_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """The process's pool of :func:`num_workers` threads, started on first use."""
    global _pool
    current = _pool
    if current is not None:
        return current
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=num_workers(), thread_name_prefix="dplr")
        return _pool


def run_all(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, on the pool when there are several items.

    The calling thread takes items too, with ``num_workers() - 1`` pool
    threads: at most :func:`num_workers` items run at once (no more threads
    than cores), each thread taking the next item when it finishes one, and
    one pool thread fewer has to wake (a wake-up cost more than a decode
    step's half on the 2-core machine).  Returns, or raises the first error,
    only once every item has finished, so no work is left writing into the
    caller's buffers.  Calls may nest (an item may call ``run_all``): a
    caller never waits for a pool thread that has not started.
    """
    if len(items) <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    indices = iter(range(len(items)))  # next() on it is atomic: each index is taken once

    def take_items() -> None:
        for i in indices:
            results[i] = fn(items[i])

    helpers = [pool().submit(take_items) for _ in range(min(num_workers(), len(items)) - 1)]
    try:
        take_items()
    finally:
        # A helper still queued (the pool busy, or this call running on a pool thread)
        # would find nothing left to take: cancel it rather than wait for it.
        for helper in helpers:
            helper.cancel()
        wait(helpers)
    for helper in helpers:
        if not helper.cancelled():
            helper.result()  # a helper's error
    return results


def split(length: int, parts: int) -> list[slice]:
    """``range(length)`` cut into at most ``parts`` contiguous, non-empty, near-equal slices."""
    parts = max(parts, 1)
    bounds = [length * i // parts for i in range(parts + 1)]  # integers: no rounding
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def stack_parts(count: int, flops: float, min_flops: float) -> list[slice]:
    """A stack of ``count`` independent items: one slice per thread when the
    work (``flops`` in all) reaches ``min_flops``, else the whole stack."""
    return split(count, num_workers() if flops >= min_flops else 1)


def lanes(count: int, columns: int, flops: float) -> list[tuple[slice, slice]]:
    """(batch entries, columns) lanes of independent recurrences for the threads.

    Batch entries go to the threads first; with fewer entries than threads
    the columns of every entry are cut as well, into ranges of at least
    :data:`~dplr._runtime.tuning.MIN_LANE_COLUMNS`.  One lane covers all
    when ``flops`` is below :data:`~dplr._runtime.tuning.LOOP_MIN_FLOPS`.
    Every (entry, column) pair lies in exactly one lane.
    """
    workers = num_workers() if flops >= tuning.LOOP_MIN_FLOPS else 1
    column_parts = max(1, min(workers // max(count, 1), columns // tuning.MIN_LANE_COLUMNS))
    rows = split(count, min(workers, max(count, 1)))
    return list(itertools.product(rows, split(columns, column_parts)))


def batch_parts(count: int) -> list[slice]:
    """Slices of a batch of ``count`` small independent problems (the rank-1 sweeps).

    One slice below :data:`~dplr._runtime.tuning.RANK1_PARALLEL_BATCH`;
    otherwise several per thread, each of at least
    :data:`~dplr._runtime.tuning.RANK1_MIN_FACTORS_PER_PART` problems.
    """
    if count < tuning.RANK1_PARALLEL_BATCH:
        return split(count, 1)
    parts = min(tuning.PARTS_PER_THREAD * num_workers(), count // tuning.RANK1_MIN_FACTORS_PER_PART)
    return split(count, parts)


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's pool (its threads do not exist here)."""
    global _pool, _pool_lock
    _pool_lock = threading.Lock()  # the parent may have forked while holding it
    _pool = None


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)
