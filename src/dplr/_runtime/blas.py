"""One process-wide, reference-counted limit on the threads of NumPy's and SciPy's BLAS.

OpenBLAS's threading of small triangular solves and stacked small products
is many times slower than one thread on the same work, so dplr runs its
chunked loops with BLAS limited to one thread and spreads the work over its
own threads instead (:mod:`dplr._runtime.threads`).

A BLAS library has one thread count for the whole process.  A context
manager that records the count on entry and writes it back on exit is wrong
as soon as two threads overlap: the second one records the first one's limit
as the "original" and, leaving last, leaves BLAS limited for good (four
threads calling dplr for a few seconds left both libraries at one thread in
3 of 3 runs).  Here the first holder records the counts; later holders only
add their request; the limit in force is the smallest request of all
holders; and the counts recorded first are written back when the last holder
leaves.  A request of ``None`` asks for no limit of its own.

After ``os.fork`` only the forking thread runs in the child: the requests of
the parent's other threads are dropped there (they can never leave) and the
counts are recomputed from what remains.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

_lock = threading.Lock()
#: Requests of the threads inside :func:`blas_threads`: thread id -> stack.
_requests: dict[int, list[int | None]] = {}
#: The libraries' thread counts before the first holder entered (None: no holder).
_original: list[int] | None = None


@lru_cache(maxsize=1)
def _libraries() -> tuple[Any, ...]:
    """threadpoolctl's controllers of the BLAS libraries dplr limits: NumPy's and SciPy's.

    threadpoolctl sees only libraries loaded when the controller is made, so
    SciPy's BLAS is loaded first: otherwise a process whose first dplr call
    came before any ``scipy.linalg`` use left SciPy's OpenBLAS multi-threaded
    for good, and the small triangular solves of the blocked Cholesky update
    ran 16x slower (545 ms instead of 35 ms at N = 3000, M = 32).
    """
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def controlled_libraries() -> list[str]:
    """File paths of the BLAS libraries whose threads dplr limits."""
    return [lib.filepath for lib in _libraries()]


def _set(lib: Any, count: int) -> None:
    """Set a library's thread count for the whole process, from any thread.

    threadpoolctl (3.6 and later) lets only one "controlling" thread change
    OpenBLAS's count and silently ignores the others; dplr's own lock already
    serialises its changes, so it releases that control around each one.
    """
    if lib.num_threads == count:
        return
    release = getattr(type(lib), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    lib.set_num_threads(count)
    if release is not None:
        release(force=True)


def _apply(libs: tuple[Any, ...], original: list[int]) -> None:
    """Set every library to the smallest request in force, capped by its original count."""
    limits = [k for stack in _requests.values() for k in stack if k is not None]
    for lib, count in zip(libs, original, strict=True):
        _set(lib, min([count, *limits]))


@contextlib.contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Run the body with BLAS limited to at most ``limit`` threads (None: no limit of its own).

    Reference-counted over the whole process: nested and concurrent uses
    combine (the smallest limit holds while any of them is inside), and the
    thread counts in force before the first one entered come back when the
    last one leaves.
    """
    global _original
    libs = _libraries()
    ident = threading.get_ident()
    with _lock:
        if _original is None:
            _original = [lib.num_threads for lib in libs]
        _requests.setdefault(ident, []).append(limit)
        _apply(libs, _original)
    try:
        yield
    finally:
        with _lock:
            stack = _requests[ident]
            stack.pop()
            if not stack:
                del _requests[ident]
            _settle(libs)


def _settle(libs: tuple[Any, ...]) -> None:
    """After a holder left (lock held): apply what remains, or restore the counts."""
    global _original
    if _original is None:
        return
    if _requests:
        _apply(libs, _original)
        return
    for lib, count in zip(libs, _original, strict=True):
        _set(lib, count)
    _original = None


def single_threaded_blas() -> contextlib.AbstractContextManager[None]:
    """:func:`blas_threads` (1): for loops of small products and triangular solves."""
    return blas_threads(1)


def _reset_after_fork() -> None:
    """In a forked child: keep only the forking thread's requests."""
    global _lock
    _lock = threading.Lock()  # another parent thread may have held it at the fork
    survivor = _requests.get(threading.get_ident())
    _requests.clear()
    if survivor:
        _requests[threading.get_ident()] = survivor
    if _original is not None and _libraries.cache_info().currsize:
        _settle(_libraries())


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)
