"""The few array operations that differ between NumPy and PyTorch.

Kernels in dplr are written once against the small namespace returned by
:func:`backend_of`.  Everything they need that is spelled the same way in both
libraries (``@``, ``*``, ``.mT``, ``.reshape``, ``.sum(axis)``,
``.cumsum(axis)``, slicing) is used directly; everything else lives here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.linalg import get_blas_funcs

Array = Any  # numpy.ndarray or torch.Tensor


def is_torch(x: object) -> bool:
    """True if ``x`` is a torch.Tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "requires_grad")


@lru_cache(maxsize=1)
def _blas_controller():
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


class NumpyOps:
    name = "numpy"

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
    def eye(n: int, like: Array) -> Array:
        return np.eye(n, dtype=like.dtype)

    @staticmethod
    def strict_lower_mask(c: int, like: Array) -> Array:
        return np.tri(c, c, -1, dtype=bool)

    @staticmethod
    def flip(x: Array, axis: int) -> Array:
        return np.flip(x, axis)

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
    def solve_lower_blocks(L: Array, B: Array) -> Array:
        """Solve ``L X = B`` for a stack of lower-triangular blocks.

        L: (..., c, c) non-unit lower triangular, B: (..., c, r); the batch
        dimensions of the two must be equal.  One level-3 ``trsm`` per block
        (in a single BLAS thread: the blocks are small).
        """
        batch = L.shape[:-2]
        c, r = B.shape[-2:]
        Lf = L.reshape(-1, c, c)
        # trsm overwrites its right-hand side: give it a Fortran-ordered copy.
        X = np.array(np.swapaxes(B.reshape(-1, c, r), -1, -2), order="C", copy=True)
        X = np.swapaxes(X, -1, -2)
        (trsm,) = get_blas_funcs(("trsm",), (Lf, X))
        with single_threaded_blas():
            for i in range(Lf.shape[0]):
                X[i] = trsm(1.0, Lf[i], X[i], lower=1, overwrite_b=1)
        return X.reshape(*batch, c, r)

    @staticmethod
    def cholesky(a: Array) -> Array:
        return np.linalg.cholesky(a)


class TorchOps:
    name = "torch"

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
    def solve_lower_blocks(L: Array, B: Array) -> Array:
        import torch

        return torch.linalg.solve_triangular(L, B, upper=False)

    @staticmethod
    def cholesky(a: Array) -> Array:
        import torch

        return torch.linalg.cholesky(a)


def backend_of(x: Array) -> type[NumpyOps] | type[TorchOps]:
    """The operations namespace for the array type of ``x``."""
    return TorchOps if is_torch(x) else NumpyOps
