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

A process forked from one that holds buffers starts with none (the
buffers of the parent's threads would only be dead weight there).
"""

from __future__ import annotations

import math
import os
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


def empty_cache() -> None:
    """Free the scratch memory dplr keeps between calls in the calling thread.

    The chunked solve keeps its large intermediates (at most 64 MiB each)
    in per-thread buffers so that the next call does not page-fault them in
    again; they are freed when the thread ends, or by this function (like
    ``torch.cuda.empty_cache``).  The next call allocates them again.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> T = dplr.LowRankTril(np.ones((4096, 8)) * 0.01, np.ones((4096, 8)) * 0.01)
    >>> x = T.solve(np.ones((4096, 8)))
    >>> dplr.empty_cache()
    """
    _buffers().clear()


def _reset_after_fork() -> None:
    """In a forked child: start without buffers (nothing in the child uses the parent's)."""
    global _local
    _local = threading.local()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)
