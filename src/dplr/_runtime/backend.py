"""The few array operations that differ between NumPy and PyTorch.

Kernels in dplr are written once against the small namespace returned by
:func:`backend_of`.  Everything they need that is spelled the same way in both
libraries (``@``, ``*``, ``.mT``, ``.reshape``, ``.sum(axis)``,
``.cumsum(axis)``, slicing) is used directly; everything else lives here.

The compiled loops that some operations run are passed in by the caller
(``kernel=``): the runtime knows how to spread a loop over threads and how to
hand CPU tensors to it, not what it computes, and imports nothing of the
algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import threads, tuning
from .workspace import scratch

Array = Any  # numpy.ndarray or torch.Tensor
Kernel = Callable[..., Any]  # a compiled loop over NumPy arrays (dplr.core._jit)


def is_torch(x: object) -> bool:
    """True if ``x`` is a torch.Tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "requires_grad")


def _stack_view(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` reshaped to ``shape`` as a view: results written there land in ``out``.

    (A reshape of a non-contiguous array would silently be a copy.)
    """
    if not out.flags.c_contiguous:
        raise ValueError("'out' must be C-contiguous")
    return out.reshape(shape)


class NumpyOps:
    """NumPy/SciPy operations.

    Kernels call these inside :func:`dplr._runtime.blas.single_threaded_blas`:
    the small products of the chunked algorithms run faster in one BLAS
    thread, and the work is spread over the cores here instead, by splitting
    stacks of independent products (``matmul``) and independent batch entries
    and columns (``substitution_pass``) between dplr's threads (NumPy
    releases the GIL inside BLAS, the compiled loops release it too).
    """

    name = "numpy"

    @staticmethod
    def matmul(a: Array, b: Array) -> Array:
        """``a @ b`` for stacks of equal batch shape, split over threads when large."""
        batch = a.shape[:-2]
        p, q, r = a.shape[-2], a.shape[-1], b.shape[-1]
        count = int(np.prod(batch))
        if a.ndim < 3 or b.shape[:-2] != batch or count < 2:
            return a @ b
        parts = threads.stack_parts(count, 2.0 * count * p * q * r, tuning.PARALLEL_MIN_FLOPS)
        if len(parts) == 1:
            return a @ b
        af, bf = a.reshape(count, p, q), b.reshape(count, q, r)
        out = np.empty((count, p, r), dtype=np.result_type(a, b))
        threads.run_all(lambda s: np.matmul(af[s], bf[s], out=out[s]), parts)
        return out.reshape(*batch, p, r)

    @staticmethod
    def scratch(name: str, shape: tuple[int, ...], like: Array) -> Array:
        """Uninitialised memory for an intermediate that dies inside the call
        (see :mod:`dplr._runtime.workspace`)."""
        return scratch(name, shape, like.dtype)

    @staticmethod
    def chunk_blocks(
        q: Array,
        k: Array,
        lam: Array,
        mask: Array | None,
        out: Array | None = None,
        *,
        kernel: Kernel,
    ) -> Array:
        """The diagonal blocks ``diag(lam) + tril(q k^T ⊙ mask, -1)`` of T, lower triangles only.

        q, k: (..., nc, c, d); lam: (..., nc, c); mask: (..., nc, c, c), the
        strict decay mask, or None.  Returns (..., nc, c, c) whose entries
        above the diagonal are undefined (written into ``out`` if given, a
        C-contiguous array of that shape).  ``kernel`` is the compiled loop
        (:func:`dplr.core._jit.form_chunk_blocks`); the chunks are split
        over threads.
        """
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
            kernel(qf[s], kf[s], lamf[s], part_mask, blocks_flat[s])

        flops = count * c * c * qf.shape[-1]
        threads.run_all(run, threads.stack_parts(count, flops, tuning.LOOP_MIN_FLOPS))
        return blocks

    @staticmethod
    def substitution_pass(
        q_in: Array,
        blocks: Array,
        k_out: Array,
        decay: Array | None,
        v: Array,
        h0: Array,
        keep_states: bool,
        *,
        kernel: Kernel,
    ) -> tuple[Array, Array]:
        """The sequential pass of the chunked solve (see :func:`dplr.core._jit.substitution_pass`).

        q_in, k_out: (B, nc, c, d); blocks: (B, nc, c, c) lower triangular;
        decay: (B, nc, 1), per channel (B, nc, d), or None; v: (B, nc, c, m);
        h0: (B, d, m).  Returns y
        (B, nc, c, m) and the states (B, nc + 1, d, m) entering every chunk
        and after the last, or (B, 1, d, m), the final state only, unless
        ``keep_states`` (a large array not worth filling).  ``kernel`` is the
        compiled pass, run on the lanes of :func:`dplr._runtime.threads.lanes`:
        batch entries on the threads and, with fewer entries than threads,
        the columns of each entry too (the columns of the state evolve
        independently).
        """
        count, nc, _, m = v.shape
        d = q_in.shape[-1]
        q_in, blocks, k_out, v, h0 = (np.ascontiguousarray(x) for x in (q_in, blocks, k_out, v, h0))
        dec = np.ones((count, nc, 1), v.dtype) if decay is None else np.ascontiguousarray(decay)
        y = np.empty(v.shape, v.dtype)
        states = np.empty((count, nc + 1 if keep_states else 1, d, m), v.dtype)

        def lane(part: tuple[slice, slice]) -> None:
            rows, cols = part
            kernel(
                q_in[rows], blocks[rows], k_out[rows], dec[rows], v[rows], h0[rows],
                y[rows], states[rows], cols.start, cols.stop,
            )  # fmt: skip

        threads.run_all(lane, threads.lanes(count, m, 4.0 * count * nc * q_in.shape[-2] * d * m))
        return y, states

    @staticmethod
    def adjoint_pass(
        k_out: Array,
        wy: Array,
        decay: Array | None,
        dy_local: Array,
        dh_add: Array,
        dh_last: Array,
        *,
        kernel: Kernel,
    ) -> tuple[Array, Array, Array]:
        """The reverse pass of :meth:`substitution_pass` (see :func:`dplr.core._jit.adjoint_pass`).

        k_out, wy: (B, nc, c, d); decay: (B, nc, 1), per channel (B, nc, d),
        or None; dy_local: (B, nc, c, m); dh_add: (B, nc, d, m); dh_last:
        (B, d, m).  Returns dy (B, nc, c, m), dh (B, nc, d, m), the gradient
        of the state leaving every chunk, and dh0 (B, d, m).  Run on the
        lanes of :func:`dplr._runtime.threads.lanes`, as the forward pass.
        """
        count, nc, c, m = dy_local.shape
        d = k_out.shape[-1]
        k_out, wy, dy_local, dh_add, dh_last = (
            np.ascontiguousarray(x) for x in (k_out, wy, dy_local, dh_add, dh_last)
        )
        dtype = dy_local.dtype
        dec = np.ones((count, nc, 1), dtype) if decay is None else np.ascontiguousarray(decay)
        dy = np.empty(dy_local.shape, dtype)
        dh = np.empty((count, nc, d, m), dtype)
        dh0 = np.empty((count, d, m), dtype)

        def lane(part: tuple[slice, slice]) -> None:
            rows, cols = part
            kernel(
                k_out[rows], wy[rows], dec[rows], dy_local[rows], dh_add[rows], dh_last[rows],
                dy[rows], dh[rows], dh0[rows], cols.start, cols.stop,
            )  # fmt: skip

        threads.run_all(lane, threads.lanes(count, m, 4.0 * count * nc * c * d * m))
        return dy, dh, dh0

    @staticmethod
    def exp(x: Array) -> Array:
        return np.exp(x)

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
    def solve_lower_blocks(L: Array, B: Array, *, kernel: Kernel) -> Array:
        """Solve ``L X = B`` for a stack of lower-triangular blocks.

        L: (..., c, c) non-unit lower triangular, B: (..., c, r); the batch
        dimensions of the two must be equal.  ``kernel`` is the compiled
        forward substitution (:func:`dplr.core._jit.solve_lower_stack`); the
        blocks are split over threads.
        """
        c, r = B.shape[-2:]
        count = math.prod(L.shape[:-2])
        Lf = np.ascontiguousarray(L.reshape(count, c, c))
        Bf = np.ascontiguousarray(B.reshape(count, c, r))
        X = np.empty_like(Bf)
        threads.run_all(
            lambda s: kernel(Lf[s], Bf[s], X[s]), threads.split(count, threads.num_workers())
        )
        return X.reshape(B.shape)

    @staticmethod
    def solve_lower_transposed_blocks(L: Array, B: Array, *, kernel: Kernel) -> Array:
        """Solve ``L^T X = B`` for a stack of lower-triangular blocks, as
        :meth:`solve_lower_blocks` (``kernel``:
        :func:`dplr.core._jit.solve_lower_transposed_stack`)."""
        return NumpyOps.solve_lower_blocks(L, B, kernel=kernel)

    @staticmethod
    def solve_lower_dense(lower: Array, b: Array) -> Array:
        """``lower^-1 b`` for dense lower-triangular matrices (only their triangle is read).

        lower: (..., n, n), b: (..., n, m), batch dimensions broadcast.  One
        LAPACK triangular solve (``trsm``) per batch entry.
        """
        from scipy.linalg import solve_triangular

        batch = np.broadcast_shapes(lower.shape[:-2], b.shape[:-2])
        if not batch:
            return solve_triangular(lower, b, lower=True, check_finite=False)
        lb = np.broadcast_to(lower, (*batch, *lower.shape[-2:]))
        bb = np.broadcast_to(b, (*batch, *b.shape[-2:]))
        out = np.empty(bb.shape, dtype=np.result_type(lower, b))
        for idx in np.ndindex(*batch):
            out[idx] = solve_triangular(lb[idx], bb[idx], lower=True, check_finite=False)
        return out

    @staticmethod
    def cholesky_flagged(a: Array) -> tuple[Array, Array]:
        """Lower Cholesky factors of a stack of SPD matrices, and where it worked.

        Returns ``(lt, ok)``: ``ok`` (...) is False for a matrix that is not
        positive definite, whose ``lt`` is then the identity (so that the
        callers' arithmetic stays finite; they discard those entries).
        """
        try:
            return np.linalg.cholesky(a), np.ones(a.shape[:-2], dtype=bool)
        except np.linalg.LinAlgError:
            pass
        flat = a.reshape(-1, *a.shape[-2:])
        lt = np.empty_like(flat)
        ok = np.ones(flat.shape[0], dtype=bool)
        for i in range(flat.shape[0]):
            try:
                lt[i] = np.linalg.cholesky(flat[i])
            except np.linalg.LinAlgError:
                lt[i] = np.eye(a.shape[-1], dtype=a.dtype)
                ok[i] = False
        return lt.reshape(a.shape), ok.reshape(a.shape[:-2])

    @staticmethod
    def qr_complete(a: Array) -> tuple[Array, Array]:
        """Complete QR factorisations ``a = Q R`` of a stack, Q (..., p, p), R (..., p, r)."""
        return np.linalg.qr(a, mode="complete")

    @staticmethod
    def copy_lower(dst: Array, src: Array, *, kernel: Kernel) -> None:
        """``dst`` (..., n, n) = the lower triangle of ``src`` (broadcast), zeros above.

        One pass per matrix and no temporary: ``kernel(src, dst, True)`` is the
        compiled triangle copy (:func:`dplr.cholesky._rank1.copy_tri`); ``dst``
        may be ``src``.
        """
        src = np.broadcast_to(src, dst.shape)
        for idx in np.ndindex(*dst.shape[:-2]):
            kernel(src[idx], dst[idx], True)


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
        q: Array,
        k: Array,
        lam: Array,
        mask: Array | None,
        out: Array | None = None,
        *,
        kernel: Kernel,
    ) -> Array:
        """As :meth:`NumpyOps.chunk_blocks` (CPU tensors share memory with NumPy views)."""
        if _all_cpu(q, k):
            q_np, k_np, lam_np = (_numpy_view(x) for x in (q, k, lam))
            mask_np = None if mask is None else _numpy_view(mask)
            out_np = None if out is None else _numpy_view(out)
            blocks = NumpyOps.chunk_blocks(q_np, k_np, lam_np, mask_np, out_np, kernel=kernel)
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
        h0: Array,
        keep_states: bool,
        *,
        kernel: Kernel,
    ) -> tuple[Array, Array]:
        """As :meth:`NumpyOps.substitution_pass`.  CPU tensors share their memory
        with NumPy views and use the compiled loop; other devices loop in torch."""
        if _all_cpu(q_in, blocks, k_out, v, h0):
            views = (None if x is None else _numpy_view(x) for x in (q_in, blocks, k_out, decay))
            out = NumpyOps.substitution_pass(
                *views, _numpy_view(v), _numpy_view(h0), keep_states, kernel=kernel
            )
            return tuple(_from_numpy(x) for x in out)
        import torch

        y = torch.empty_like(v)
        h = h0
        states = [h]
        for j in range(v.shape[1]):
            rhs = v[:, j] - q_in[:, j] @ h
            y[:, j] = torch.linalg.solve_triangular(blocks[:, j], rhs, upper=False)
            h = k_out[:, j].mT @ y[:, j] + (h if decay is None else decay[:, j, :, None] * h)
            if keep_states:
                states.append(h)
        return y, torch.stack(states if keep_states else [h], 1)

    @staticmethod
    def adjoint_pass(
        k_out: Array,
        wy: Array,
        decay: Array | None,
        dy_local: Array,
        dh_add: Array,
        dh_last: Array,
        *,
        kernel: Kernel,
    ) -> tuple[Array, Array, Array]:
        """As :meth:`NumpyOps.adjoint_pass`.  CPU tensors share their memory with
        NumPy views and use the compiled loop; other devices loop in torch."""
        if _all_cpu(k_out, wy, dy_local, dh_add, dh_last):
            dec = None if decay is None else _numpy_view(decay)
            views = (_numpy_view(x) for x in (k_out, wy))
            rest = (_numpy_view(x) for x in (dy_local, dh_add, dh_last))
            out = NumpyOps.adjoint_pass(*views, dec, *rest, kernel=kernel)
            return tuple(_from_numpy(x) for x in out)
        dy = dy_local.new_empty(dy_local.shape)
        dh = dh_add.new_empty(dh_add.shape)
        grad = dh_last
        for j in reversed(range(dy_local.shape[1])):
            dh[:, j] = grad
            dy[:, j] = dy_local[:, j] + k_out[:, j] @ grad
            grad = grad if decay is None else decay[:, j, :, None] * grad
            grad = grad + dh_add[:, j] - wy[:, j].mT @ dy[:, j]
        return dy, dh, grad

    @staticmethod
    def exp(x: Array) -> Array:
        return x.exp()

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
    def solve_lower_blocks(L: Array, B: Array, *, kernel: Kernel) -> Array:
        """As :meth:`NumpyOps.solve_lower_blocks` (the compiled loop for CPU tensors,
        which is several times faster there than ``torch.linalg.solve_triangular``)."""
        if _all_cpu(L, B):
            x = NumpyOps.solve_lower_blocks(_numpy_view(L), _numpy_view(B), kernel=kernel)
            return _from_numpy(x)
        import torch

        return torch.linalg.solve_triangular(L, B, upper=False)

    @staticmethod
    def solve_lower_transposed_blocks(L: Array, B: Array, *, kernel: Kernel) -> Array:
        """As :meth:`NumpyOps.solve_lower_transposed_blocks` (the compiled loop for
        CPU tensors)."""
        if _all_cpu(L, B):
            x = NumpyOps.solve_lower_blocks(_numpy_view(L), _numpy_view(B), kernel=kernel)
            return _from_numpy(x)
        import torch

        return torch.linalg.solve_triangular(L.mT, B, upper=True)

    @staticmethod
    def solve_lower_dense(lower: Array, b: Array) -> Array:
        """As :meth:`NumpyOps.solve_lower_dense` (``torch.linalg.solve_triangular``)."""
        import torch

        return torch.linalg.solve_triangular(lower, b, upper=False)

    @staticmethod
    def cholesky_flagged(a: Array) -> tuple[Array, Array]:
        """As :meth:`NumpyOps.cholesky_flagged` (``torch.linalg.cholesky_ex``)."""
        import torch

        lt, info = torch.linalg.cholesky_ex(a)
        ok = info == 0
        if not bool(ok.all()):
            lt = torch.where(ok[..., None, None], lt, TorchOps.eye(a.shape[-1], a))
        return lt, ok

    @staticmethod
    def qr_complete(a: Array) -> tuple[Array, Array]:
        """As :meth:`NumpyOps.qr_complete` (``torch.linalg.qr``)."""
        import torch

        return torch.linalg.qr(a, mode="complete")

    @staticmethod
    def copy_lower(dst: Array, src: Array, *, kernel: Kernel) -> None:
        """As :meth:`NumpyOps.copy_lower`, by ``torch.tril`` (any device; ``kernel`` unused)."""
        import torch

        dst[...] = torch.tril(src.expand(dst.shape))


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


Ops = type[NumpyOps] | type[TorchOps]
