"""The few array operations that differ between NumPy and PyTorch.

Kernels in dplr are written once against the small namespace returned by
:func:`backend_of`.  Everything they need that is spelled the same way in both
libraries (``@``, ``*``, ``.mT``, ``.reshape``, ``.sum(axis)``,
``.cumsum(axis)``, slicing) is used directly; everything else lives here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from .workspace import scratch

Array = Any  # numpy.ndarray or torch.Tensor


def is_torch(x: object) -> bool:
    """True if ``x`` is a torch.Tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "requires_grad")


@lru_cache(maxsize=1)
def _blas_controller():
    """The BLAS libraries dplr limits: NumPy's and SciPy's (each wheel bundles its own).

    threadpoolctl sees only libraries loaded when the controller is made, so
    SciPy's BLAS is loaded first: otherwise a process whose first dplr call
    came before any ``scipy.linalg`` use left SciPy's OpenBLAS multi-threaded
    for good, and the small triangular solves of the blocked Cholesky update
    ran 16x slower (545 ms instead of 35 ms at N = 3000, M = 32).
    """
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit NumPy/SciPy BLAS to one thread for loops of small products.

    OpenBLAS's threading of small triangular solves and stacked small matrix
    products is many times slower than one thread on the same work.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def num_workers() -> int:
    """Threads the NumPy backend uses: ``DPLR_NUM_THREADS``, else the usable CPUs."""
    configured = os.environ.get("DPLR_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=num_workers(), thread_name_prefix="dplr")


#: Below this many flops a product is not worth splitting over threads.
_PARALLEL_MIN_FLOPS = 4e6

#: Below this many flops the compiled loops of the solve run on the calling
#: thread: handing them to the pool and waiting cost more than it saved up to
#: n = 1024 (d = m = 64: 0.94 ms on one thread, 1.3 ms split over two) and
#: broke even at n = 2048 (34 MFLOP in the state pass) on the 2-core VM.
_LOOP_MIN_FLOPS = 3e7


#: Narrowest column range worth a thread of its own in the state pass: the
#: products of narrower ranges run too far below the compiled kernel's peak
#: to gain.
_MIN_LANE_COLUMNS = 16


def _split(length: int, parts: int) -> list[slice]:
    bounds = np.linspace(0, length, parts + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _stack_view(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` reshaped to ``shape`` as a view: results written there land in ``out``.

    (A reshape of a non-contiguous array would silently be a copy.)
    """
    if not out.flags.c_contiguous:
        raise ValueError("'out' must be C-contiguous")
    return out.reshape(shape)


class NumpyOps:
    """NumPy/SciPy operations.

    Kernels call these inside :func:`single_threaded_blas`: the small
    products of the chunked algorithms run faster in one BLAS thread, and
    the work is spread over the cores here instead, by splitting stacks of
    independent products (``matmul``) and independent batch entries
    (``substitution_pass``, ``map``)
    between threads (NumPy releases the GIL inside BLAS).
    """

    name = "numpy"

    @staticmethod
    def matmul(a: Array, b: Array) -> Array:
        """``a @ b`` for stacks of equal batch shape, split over threads when large."""
        workers = num_workers()
        batch = a.shape[:-2]
        p, q, r = a.shape[-2], a.shape[-1], b.shape[-1]
        count = int(np.prod(batch))
        if (
            a.ndim < 3
            or b.shape[:-2] != batch
            or workers == 1
            or count < 2
            or 2.0 * count * p * q * r < _PARALLEL_MIN_FLOPS
        ):
            return a @ b
        af, bf = a.reshape(count, p, q), b.reshape(count, q, r)
        out = np.empty((count, p, r), dtype=np.result_type(a, b))
        parts = _split(count, workers)
        list(_pool().map(lambda s: np.matmul(af[s], bf[s], out=out[s]), parts))
        return out.reshape(*batch, p, r)

    @staticmethod
    def scratch(name: str, shape: tuple[int, ...], like: Array) -> Array:
        """Uninitialised memory for an intermediate that dies inside the call
        (see :mod:`dplr._runtime.workspace`)."""
        return scratch(name, shape, like.dtype)

    @staticmethod
    def chunk_blocks(
        q: Array, k: Array, lam: Array, mask: Array | None, out: Array | None = None
    ) -> Array:
        """The diagonal blocks ``diag(lam) + tril(q k^T ⊙ mask, -1)`` of T, lower triangles only.

        q, k: (..., nc, c, d); lam: (..., nc, c); mask: (..., nc, c, c), the
        strict decay mask, or None.  Returns (..., nc, c, c) whose entries
        above the diagonal are undefined (written into ``out`` if given, a
        C-contiguous array of that shape).  Compiled
        (:func:`dplr.core._jit.form_chunk_blocks`), the chunks split over threads.
        """
        from ..core._jit import form_chunk_blocks

        c = q.shape[-2]
        count = math.prod(q.shape[:-2])
        qf, kf = (np.ascontiguousarray(x.reshape(count, c, x.shape[-1])) for x in (q, k))
        lamf = np.ascontiguousarray(lam.reshape(count, c))
        maskf = np.empty((0, c, c), qf.dtype) if mask is None else mask.reshape(count, c, c)
        maskf = np.ascontiguousarray(maskf)
        blocks = np.empty((*q.shape[:-1], c), qf.dtype) if out is None else out
        blocks_flat = _stack_view(blocks, (count, c, c))

        def run(s: slice) -> None:
            part_mask = maskf if mask is None else maskf[s]
            form_chunk_blocks(qf[s], kf[s], lamf[s], part_mask, blocks_flat[s])

        parallel = count * c * c * qf.shape[-1] >= _LOOP_MIN_FLOPS
        NumpyOps.map(run, _split(count, num_workers() if parallel else 1))
        return blocks

    @staticmethod
    def substitution_pass(
        q_in: Array,
        blocks: Array,
        k_out: Array,
        decay: Array | None,
        v: Array,
        z0: Array,
        keep_states: bool,
    ) -> tuple[Array, Array]:
        """The sequential pass of the chunked solve (see :func:`dplr.core._jit.substitution_pass`).

        q_in, k_out: (B, nc, c, d); blocks: (B, nc, c, c) lower triangular;
        decay: (B, nc) or None; v: (B, nc, c, m); z0: (B, d, m).  Returns y
        (B, nc, c, m) and the states (B, nc + 1, d, m) entering every chunk
        and after the last, or (B, 1, d, m), the final state only, unless
        ``keep_states`` (a large array not worth filling).
        Batch entries run on the threads; with fewer entries than threads,
        the columns of each entry are split between them too (the columns of
        the state evolve independently).
        """
        from ..core._jit import substitution_pass

        count, nc, _, m = v.shape
        d = q_in.shape[-1]
        q_in, blocks, k_out, v, z0 = (np.ascontiguousarray(x) for x in (q_in, blocks, k_out, v, z0))
        dec = np.ones((count, nc), v.dtype) if decay is None else np.ascontiguousarray(decay)
        y = np.empty(v.shape, v.dtype)
        states = np.empty((count, nc + 1 if keep_states else 1, d, m), v.dtype)
        parallel = 4.0 * count * nc * q_in.shape[-2] * d * m >= _LOOP_MIN_FLOPS
        workers = num_workers() if parallel else 1
        column_parts = max(1, min(workers // max(count, 1), m // _MIN_LANE_COLUMNS))
        lanes = list(
            itertools.product(_split(count, min(workers, max(count, 1))), _split(m, column_parts))
        )

        def lane(part: tuple[slice, slice]) -> None:
            rows, cols = part
            substitution_pass(
                q_in[rows], blocks[rows], k_out[rows], dec[rows], v[rows], z0[rows],
                y[rows], states[rows], cols.start, cols.stop,
            )  # fmt: skip

        NumpyOps.map(lane, lanes)
        return y, states

    @staticmethod
    def map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, on the thread pool when there are several."""
        if len(items) == 1:
            return [fn(items[0])]
        return list(_pool().map(fn, items))

    @staticmethod
    def exp(x: Array) -> Array:
        return np.exp(x)

    @staticmethod
    def log(x: Array) -> Array:
        return np.log(x)

    @staticmethod
    def where(cond: Array, a: Array, b: Array | float) -> Array:
        return np.where(cond, a, b)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: Array) -> Array:
        return np.zeros(shape, dtype=like.dtype)

    @staticmethod
    def empty(shape: tuple[int, ...], like: Array) -> Array:
        """Uninitialised (no zero-filling pass): for arrays the caller writes in full."""
        return np.empty(shape, dtype=like.dtype)

    @staticmethod
    def eye(n: int, like: Array) -> Array:
        return np.eye(n, dtype=like.dtype)

    @staticmethod
    def strict_lower_mask(c: int, like: Array) -> Array:
        return np.tri(c, c, -1, dtype=bool)

    @staticmethod
    def flip(x: Array, axis: int) -> Array:
        return np.flip(x, axis)

    @staticmethod
    def keep_strict_lower(x: Array) -> Array:
        """Zero the diagonal and upper triangle of every matrix of a fresh stack, in place."""
        return np.multiply(x, np.tri(x.shape[-1], x.shape[-1], -1, dtype=x.dtype), out=x)

    @staticmethod
    def multiply_(x: Array, y: Array) -> Array:
        """``x *= y`` for a fresh array x (saves allocating another)."""
        x *= y
        return x

    @staticmethod
    def concat(xs: list[Array], axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    @staticmethod
    def stack(xs: list[Array], axis: int) -> Array:
        return np.stack(xs, axis=axis)

    @staticmethod
    def pad_axis(x: Array, axis: int, after: int, value: float = 0.0) -> Array:
        """Append ``after`` entries equal to ``value`` along ``axis``."""
        if after == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, after)
        return np.pad(x, widths, constant_values=value)

    @staticmethod
    def broadcast_to(x: Array, shape: tuple[int, ...]) -> Array:
        return np.broadcast_to(x, shape)

    @staticmethod
    def copy(x: Array) -> Array:
        return np.array(x, copy=True)

    @staticmethod
    def solve_lower_blocks(L: Array, B: Array) -> Array:
        """Solve ``L X = B`` for a stack of lower-triangular blocks.

        L: (..., c, c) non-unit lower triangular, B: (..., c, r); the batch
        dimensions of the two must be equal.  Compiled forward substitution
        (:func:`dplr.core._jit.solve_lower_stack`), the blocks split over threads.
        """
        from ..core._jit import solve_lower_stack

        c, r = B.shape[-2:]
        count = math.prod(L.shape[:-2])
        Lf = np.ascontiguousarray(L.reshape(count, c, c))
        Bf = np.ascontiguousarray(B.reshape(count, c, r))
        X = np.empty_like(Bf)
        parts = _split(count, num_workers())
        NumpyOps.map(lambda s: solve_lower_stack(Lf[s], Bf[s], X[s]), parts)
        return X.reshape(B.shape)

    @staticmethod
    def cholesky(a: Array) -> Array:
        return np.linalg.cholesky(a)


class TorchOps:
    """PyTorch operations (any device); torch parallelises inside each operation."""

    name = "torch"

    @staticmethod
    def matmul(a: Array, b: Array) -> Array:
        return a @ b

    @staticmethod
    def scratch(name: str, shape: tuple[int, ...], like: Array) -> Array | None:
        """As :meth:`NumpyOps.scratch` for CPU float32/float64 tensors outside
        autograd; None (allocate as usual) otherwise."""
        import torch

        dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(like.dtype)
        if like.device.type != "cpu" or dtype is None or torch.is_grad_enabled():
            return None
        return torch.from_numpy(scratch(name, shape, dtype))

    @staticmethod
    def chunk_blocks(
        q: Array, k: Array, lam: Array, mask: Array | None, out: Array | None = None
    ) -> Array:
        """As :meth:`NumpyOps.chunk_blocks` (CPU tensors share memory with NumPy views)."""
        if _all_cpu(q, k):
            q_np, k_np, lam_np = (_numpy_view(x) for x in (q, k, lam))
            mask_np = None if mask is None else _numpy_view(mask)
            out_np = None if out is None else _numpy_view(out)
            blocks = NumpyOps.chunk_blocks(q_np, k_np, lam_np, mask_np, out_np)
            return out if out is not None else _from_numpy(blocks)
        import torch

        strict = q @ k.mT
        strict = strict.tril(-1) if mask is None else strict * mask
        return strict + torch.diag_embed(lam)

    @staticmethod
    def substitution_pass(
        q_in: Array,
        blocks: Array,
        k_out: Array,
        decay: Array | None,
        v: Array,
        z: Array,
        keep_states: bool,
    ) -> tuple[Array, Array]:
        """As :meth:`NumpyOps.substitution_pass`.  CPU tensors share their memory
        with NumPy views and use the compiled loop; other devices loop in torch."""
        if _all_cpu(q_in, blocks, k_out, v, z):
            views = (None if x is None else _numpy_view(x) for x in (q_in, blocks, k_out, decay))
            out = NumpyOps.substitution_pass(*views, _numpy_view(v), _numpy_view(z), keep_states)
            return tuple(_from_numpy(x) for x in out)
        import torch

        y = torch.empty_like(v)
        states = [z]
        for j in range(v.shape[1]):
            rhs = v[:, j] - q_in[:, j] @ z
            y[:, j] = torch.linalg.solve_triangular(blocks[:, j], rhs, upper=False)
            z = k_out[:, j].mT @ y[:, j] + (z if decay is None else decay[:, j, None, None] * z)
            if keep_states:
                states.append(z)
        return y, torch.stack(states if keep_states else [z], 1)

    @staticmethod
    def map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return [fn(x) for x in items]

    @staticmethod
    def exp(x: Array) -> Array:
        return x.exp()

    @staticmethod
    def log(x: Array) -> Array:
        return x.log()

    @staticmethod
    def where(cond: Array, a: Array, b: Array | float) -> Array:
        import torch

        return torch.where(cond, a, b)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: Array) -> Array:
        return like.new_zeros(shape)

    @staticmethod
    def empty(shape: tuple[int, ...], like: Array) -> Array:
        return like.new_empty(shape)

    @staticmethod
    def eye(n: int, like: Array) -> Array:
        import torch

        return torch.eye(n, dtype=like.dtype, device=like.device)

    @staticmethod
    def strict_lower_mask(c: int, like: Array) -> Array:
        import torch

        return torch.ones(c, c, dtype=torch.bool, device=like.device).tril(-1)

    @staticmethod
    def flip(x: Array, axis: int) -> Array:
        return x.flip(axis)

    @staticmethod
    def keep_strict_lower(x: Array) -> Array:
        return x.tril_(-1)

    @staticmethod
    def multiply_(x: Array, y: Array) -> Array:
        return x.mul_(y)

    @staticmethod
    def concat(xs: list[Array], axis: int) -> Array:
        import torch

        return torch.cat(xs, dim=axis)

    @staticmethod
    def stack(xs: list[Array], axis: int) -> Array:
        import torch

        return torch.stack(xs, dim=axis)

    @staticmethod
    def pad_axis(x: Array, axis: int, after: int, value: float = 0.0) -> Array:
        if after == 0:
            return x
        shape = list(x.shape)
        shape[axis] = after
        return TorchOps.concat([x, x.new_full(shape, value)], axis)

    @staticmethod
    def broadcast_to(x: Array, shape: tuple[int, ...]) -> Array:
        return x.expand(shape)

    @staticmethod
    def copy(x: Array) -> Array:
        return x.clone()

    @staticmethod
    def solve_lower_blocks(L: Array, B: Array) -> Array:
        """As :meth:`NumpyOps.solve_lower_blocks` (the compiled loop for CPU tensors,
        which is several times faster there than ``torch.linalg.solve_triangular``)."""
        if _all_cpu(L, B):
            return _from_numpy(NumpyOps.solve_lower_blocks(_numpy_view(L), _numpy_view(B)))
        import torch

        return torch.linalg.solve_triangular(L, B, upper=False)

    @staticmethod
    def cholesky(a: Array) -> Array:
        import torch

        return torch.linalg.cholesky(a)


def _all_cpu(*xs: Array) -> bool:
    return all(x.device.type == "cpu" for x in xs)


def _numpy_view(x: Array) -> np.ndarray:
    """A NumPy array sharing the memory of a CPU tensor (no copy, no autograd)."""
    return x.detach().numpy()


def _from_numpy(x: np.ndarray) -> Array:
    import torch

    return torch.from_numpy(x)


def backend_of(x: Array) -> type[NumpyOps] | type[TorchOps]:
    """The operations namespace for the array type of ``x``."""
    return TorchOps if is_torch(x) else NumpyOps
