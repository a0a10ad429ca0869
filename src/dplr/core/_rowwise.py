"""The row-by-row path of the core product and solve, for small d.

For d up to :data:`~dplr._runtime.tuning.RECURRENT_MAX_RANK` the chunked
kernels spend most of their time forming c x c diagonal blocks (O(n c) work
and memory, against the O(n d m) of the answer).  The compiled loop
:func:`dplr.core._jit.recurrence` walks the rows once with a d x m state
instead, in the caller's memory plus the output (docs/algorithms.md,
section 11).  :func:`dplr.core._kernels.solve` and
:func:`~dplr.core._kernels.matmul` call it for NumPy arrays and CPU tensors
when it applies.  The loop also checks what it reads for NaN and Inf, so
that a checked call makes one pass over its inputs instead of two
(:class:`NonFiniteInput`).
"""

from __future__ import annotations

import numpy as np

from .._runtime import backend, threads, tuning
from .._runtime.backend import Array
from . import _jit


class NonFiniteInput(Exception):
    """:func:`run` was asked to check its operands and read a NaN or an Inf (or nothing).

    Not an argument error of its own: the caller runs its usual checks,
    which name the argument.
    """


def applies(q: Array, v: Array) -> bool:
    """True when the row-by-row loop should run: small d, float32/float64 on the CPU."""
    if q.shape[-1] > tuning.RECURRENT_MAX_RANK or q.shape[-2] == 0:
        return False
    if isinstance(q, np.ndarray):
        return q.dtype in (np.float32, np.float64)
    return backend._all_cpu(q, v) and q.dtype.is_floating_point


def run(
    q: Array,
    k: Array,
    lam: Array | None,
    log_decay: Array | None,
    v: Array,
    h0: Array | None,
    solve: bool,
    check_finite: bool = False,
) -> tuple[Array, Array]:
    """``(Y, h_n)`` of the product (``solve=False``) or the solve, as the chunked kernels give.

    Shapes as in :mod:`dplr.core._kernels` (batch dimensions broadcast
    already; ``lam`` None for a unit diagonal); torch CPU tensors are
    computed through NumPy views.  With ``check_finite``, raises
    :class:`NonFiniteInput` after the loop if q, k, lam, ``exp(log_decay)``
    or v held a NaN or an Inf (h0 is not checked), or if it read nothing
    (m = 0 or an empty batch).
    """
    torch_in = not isinstance(q, np.ndarray)
    arrays = [x if x is None or not torch_in else x.detach().numpy() for x in (q, k, lam, v, h0)]
    ld = None if log_decay is None else (log_decay.detach().numpy() if torch_in else log_decay)
    qn, kn, lamn, vn, h0n = arrays
    batch, (n, d), m = qn.shape[:-2], qn.shape[-2:], vn.shape[-1]
    count = int(np.prod(batch))

    def flat(x: np.ndarray, tail: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(x, (*batch, *tail)).reshape(count, *tail))

    if ld is None:
        factors = np.empty((count, n, 0), qn.dtype)
    else:
        per_channel = ld.ndim == qn.ndim
        factors = np.exp(ld if per_channel else ld[..., None])  # exp(-inf) = 0: a reset
        factors = flat(factors, (n, d if per_channel else 1))
    qf, kf, vf = flat(qn, (n, d)), flat(kn, (n, d)), flat(vn, (n, m))
    lamf = np.empty((count, 0), qn.dtype) if lamn is None else flat(lamn, (n,))
    h0f = np.zeros((count, d, m), qn.dtype) if h0n is None else flat(h0n, (d, m))
    y = np.empty((count, n, m), qn.dtype)
    hn = np.empty((count, d, m), qn.dtype)

    def lane(part: tuple[slice, slice]) -> bool:
        rows, cols = part
        return _jit.recurrence(
            qf[rows], kf[rows], lamf[rows], factors[rows], vf[rows], h0f[rows],
            y[rows], hn[rows], solve, cols.start, cols.stop,
        )  # fmt: skip

    finite = threads.run_all(lane, threads.lanes(count, m, 4.0 * count * n * d * m))
    if check_finite and not (finite and all(finite)):  # no lanes: nothing was read (m = 0)
        raise NonFiniteInput
    y, hn = y.reshape(*batch, n, m), hn.reshape(*batch, d, m)
    if torch_in:
        import torch

        return torch.from_numpy(y), torch.from_numpy(hn)
    return y, hn
