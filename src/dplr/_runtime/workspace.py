"""Scratch memory kept between calls for the large intermediates of one call.

A chunked solve has large intermediates that die when it returns: the
diagonal blocks (4 MiB at n = 16384, d = 64, float64).  glibc serves every
allocation of several MiB with a fresh ``mmap`` and unmaps it on ``free``,
so each call page-faulted all of it in again.  On the 2-core machine the
benchmarks run on, when the solve also allocated W (12 MiB in all), that
cost up to half of the solve and made its time vary 2x from call to call
(measured: 1000-2000 faults and 14-29 ms per call, against no faults and
12 ms with the buffers below).

:func:`scratch` hands out views of per-thread buffers that are kept and
grown, never shrunk, up to :data:`MAX_CACHED_BYTES` each;
:func:`empty_cache` (public as ``dplr.empty_cache``) frees them.  A scratch
array is valid until the next request for the same name in the same thread,
so it must never be returned to a caller or kept past the call that asked
for it.

The arrays dplr hands out have the same cost: the delta rules' outputs
and what autograd keeps for their backward pass (600 MB at B = 1,
T = 4096, H = 32, K = V = 128 in float32) were mapped afresh by every call
of a training step.  :func:`recycled` gives such an array the memory of an
earlier one that nothing refers to any more (CPython's reference count of
the kept buffer says so), process-wide, for arrays of at least
:data:`MIN_RECYCLED_BYTES`, keeping at most :data:`MAX_RECYCLED_BYTES`.
Measured at that shape on the 2-core machine (one process, alternating,
medians of 9): forward and backward 813 -> 566 ms and 919 -> 644 ms.

A process forked from one that holds buffers starts with none (the
buffers of the parent's threads would only be dead weight there).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

#: Larger requests get a fresh array, so that a thread holds at most a few
#: of these (the solve uses one name: 4 MiB at n = 16384, d = 64, float64).
MAX_CACHED_BYTES = 64 * 2**20

_local = threading.local()


def _buffers() -> dict[str, np.ndarray]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array backed by this thread's buffer ``name``."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_CACHED_BYTES:
        return np.empty(shape, dtype)
    buffers = _buffers()
    buffer = buffers.get(name)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[name] = np.empty(max(nbytes, 1), np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


#: Smaller arrays come from ``np.empty``: glibc serves them from memory it
#: keeps (its threshold for a fresh mapping grows to at most 32 MiB).
MIN_RECYCLED_BYTES = 32 * 2**20

#: Arrays from :func:`recycled` start at a multiple of this many bytes (a cache
#: line: streaming stores, :mod:`dplr._runtime.stream`, write whole lines).
ALIGNMENT = 64

#: At most this many bytes in buffers kept by :func:`recycled`.
MAX_RECYCLED_BYTES = 2**30

#: The test of :func:`recycled` reads CPython's reference counts, which a
#: build without the GIL defers and which other interpreters do not keep.
_COUNTS_REFERENCES = (
    sys.implementation.name == "cpython" and getattr(sys, "_is_gil_enabled", lambda: True)()
)

_recycled: list[np.ndarray] = []  # uint8 buffers; free when this list's is their only reference
_recycled_lock = threading.Lock()


def _is_free(i: int) -> bool:
    return sys.getrefcount(_recycled[i]) == 2  # this list's reference and the argument's


def recycled(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array that may be handed out, in reused memory.

    Unlike :func:`scratch`, the array may be returned to the caller or kept
    by autograd: its memory is reused only once nothing refers to it (nor
    to any view of it).  Arrays below :data:`MIN_RECYCLED_BYTES` and those
    that would take the kept buffers over :data:`MAX_RECYCLED_BYTES` (after
    dropping free buffers of other sizes) come from ``np.empty``, and so do
    all arrays where reference counts cannot tell (an interpreter other than
    CPython, or CPython without the GIL).  Thread-safe.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_RECYCLED_BYTES or not _COUNTS_REFERENCES:
        return np.empty(shape, dtype)
    nbytes_kept = nbytes + ALIGNMENT  # room to start the array on a line boundary
    with _recycled_lock:
        found = next(
            (i for i in range(len(_recycled))
             if _recycled[i].nbytes == nbytes_kept and _is_free(i)),
            None,
        )  # fmt: skip
        if found is not None:
            buffer = _recycled[found]
        else:
            buffer = np.empty(nbytes_kept, np.uint8)
            kept = sum(x.nbytes for x in _recycled)
            for i in range(len(_recycled) - 1, -1, -1):  # make room: drop free buffers
                if kept + nbytes_kept <= MAX_RECYCLED_BYTES:
                    break
                if _is_free(i):
                    kept -= _recycled.pop(i).nbytes
            if kept + nbytes_kept <= MAX_RECYCLED_BYTES:
                _recycled.append(buffer)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def empty_cache() -> None:
    """Free the memory dplr keeps between calls.

    The chunked solve keeps its large intermediates (at most 64 MiB each)
    in per-thread buffers so that the next call does not page-fault them in
    again; they are freed when the thread ends, or by this function for the
    calling thread (like ``torch.cuda.empty_cache``).  This function also
    lets go of the memory kept for the large arrays dplr hands out (the
    delta rules' outputs and the tensors autograd saves for their backward
    pass, at most 1 GiB in all, reused only once nothing refers to them),
    for all threads.  The next call allocates them again.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> T = dplr.LowRankTril(np.ones((4096, 8)) * 0.01, np.ones((4096, 8)) * 0.01)
    >>> x = T.solve(np.ones((4096, 8)))
    >>> dplr.empty_cache()
    """
    _buffers().clear()
    with _recycled_lock:
        _recycled.clear()


def _reset_after_fork() -> None:
    """In a forked child: start without buffers (nothing in the child uses the parent's)."""
    global _local, _recycled_lock
    _local = threading.local()
    _recycled_lock = threading.Lock()  # a lock held by another thread at the fork stays held
    _recycled.clear()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)
