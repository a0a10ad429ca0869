"""BLAS's gemm called from compiled (Numba) loops, on row-major arrays.

Numba's ``np.dot`` calls SciPy's BLAS but only as ``C = A B`` on contiguous
arrays.  The fused chunk loop of the delta rules needs ``C = alpha op(A) B +
beta C`` on strided rows (a block of the output tensor, a transposed
operand), so :func:`gemm` calls ``sgemm``/``dgemm`` of
``scipy.linalg.cython_blas`` (SciPy's BLAS, the library that
:mod:`dplr._runtime.blas` limits) through its C address.

The address is registered with LLVM under a fixed symbol name when this
module is imported, and the compiled code calls the symbol, not a constant
address: Numba's on-disk cache stays valid across processes.  Pointer
arguments are passed as pointer-sized integers (``arr.ctypes.data``), which
the x86-64 and AArch64 calling conventions pass exactly as pointers.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from numba import types

from .jit import jit
from .lapack import cython_address

llvm.add_symbol("dplr_sgemm", cython_address("blas", "sgemm"))
llvm.add_symbol("dplr_dgemm", cython_address("blas", "dgemm"))
# gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), every argument a pointer.
_signature = types.void(*([types.intp] * 13))
_sgemm = types.ExternalFunction("dplr_sgemm", _signature)
_dgemm = types.ExternalFunction("dplr_dgemm", _signature)


@jit(nogil=True)
def gemm_scratch(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The argument cells one thread passes to :func:`gemm`: 6 ints, 2 scalars, 'N' and 'T'."""
    flags = np.empty(2, np.uint8)
    flags[0], flags[1] = ord("N"), ord("T")
    return np.empty(6, np.int32), np.empty(2, dtype), flags


@jit(nogil=True)
def gemm(a, b, c, alpha, beta, transpose_a, scratch) -> None:
    """``c = alpha * op(a) @ b + beta * c``, op(a) = ``a.T`` if ``transpose_a`` else ``a``.

    a, b, c: 2-d float32 or float64 arrays (one dtype) whose rows are
    contiguous (any row stride); c (m, n), op(a) (m, k), b (k, n).  With
    ``beta == 0`` c is only written.  ``scratch`` is :func:`gemm_scratch` of
    the dtype, owned by the calling thread.  Releases nothing and takes no
    lock: the BLAS library's own thread count applies (dplr's loops run it
    with one thread, :func:`dplr._runtime.blas.single_threaded_blas`).
    """
    gemm_both(a, b, c, alpha, beta, transpose_a, False, scratch)


@jit(nogil=True)
def gemm_both(a, b, c, alpha, beta, transpose_a, transpose_b, scratch) -> None:
    """``c = alpha * op(a) @ op(b) + beta * c``: :func:`gemm` with ``b.T`` allowed too.

    op(a) (m, k), op(b) (k, n), c (m, n); as stored, every array's rows are
    contiguous (any row stride).
    """
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    if m == 0 or n == 0:
        return
    ints, scalars, flags = scratch
    size = c.itemsize
    # C^T = op(B)^T op(A)^T in column-major terms; a row-major (r, s) array with
    # row stride ld is a column-major (s, r) one with leading dimension ld.
    ints[0], ints[1], ints[2] = n, m, k
    ints[3] = max(b.strides[0] // size, b.shape[1], 1)
    ints[4] = max(a.strides[0] // size, a.shape[1], 1)
    ints[5] = max(c.strides[0] // size, n, 1)
    scalars[0], scalars[1] = alpha, beta
    cells, values, chars = ints.ctypes.data, scalars.ctypes.data, flags.ctypes.data
    trans_a = chars + 1 if transpose_a else chars
    trans_b = chars + 1 if transpose_b else chars
    args = (trans_b, trans_a, cells, cells + 4, cells + 8, values, b.ctypes.data, cells + 12,
            a.ctypes.data, cells + 16, values + size, c.ctypes.data, cells + 20)  # fmt: skip
    if size == 4:
        _sgemm(*args)
    else:
        _dgemm(*args)
