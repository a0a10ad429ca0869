"""Two LAPACK routines called on sub-blocks in place, with the GIL released.

SciPy's ``scipy.linalg.lapack`` wrappers copy any operand that is not a
whole contiguous array and hold the GIL while LAPACK runs, so a reduction
cannot be split over threads through them.  The same routines are exported
by ``scipy.linalg.cython_lapack`` (the LAPACK that SciPy links, Fortran
calling convention: every argument by address); :mod:`ctypes` calls them on
views given as (pointer, leading dimension), and releases the GIL for the
duration of the call.

Only the triangular-pentagonal QR pair is bound: ``?tpqrt`` factors
``[A; B]`` with A upper triangular (N x N) and B dense (M x N, ``l = 0``),
``?tpmqrt`` applies the resulting ``Q^T`` to a further ``[A; B]`` pair.
Operands are column-major (Fortran-ordered) float32 or float64 arrays.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from collections.abc import Callable

import numpy as np

_c_int = ctypes.c_int


def cython_address(library: str, name: str) -> int:
    """The C address of ``scipy.linalg.cython_<library>.<name>`` (library: "blas" or "lapack")."""
    module = importlib.import_module(f"scipy.linalg.cython_{library}")
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


@functools.cache
def _routine(name: str, arg_count: int) -> Callable[..., None]:
    """The LAPACK routine ``name`` as a ctypes function (it releases the GIL when called)."""
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * arg_count))(cython_address("lapack", name))


def _prefix(dtype: np.dtype) -> str:
    if dtype == np.float64:
        return "d"
    if dtype == np.float32:
        return "s"
    raise TypeError(f"LAPACK routines here take float32 or float64, not {dtype}")


def _at(a: np.ndarray, row: int, col: int) -> ctypes.c_void_p:
    """Address of ``a[row, col]`` in a column-major array."""
    return ctypes.c_void_p(a.ctypes.data + (row * a.strides[0] + col * a.strides[1]))


def _ref(value: int) -> ctypes._Pointer:
    return ctypes.byref(_c_int(value))


def _leading(a: np.ndarray) -> int:
    if a.strides[0] != a.itemsize or a.strides[1] % a.itemsize:
        raise ValueError("LAPACK operands must be column-major (Fortran-ordered)")
    return max(1, a.strides[1] // a.itemsize)


def tpqrt(a: np.ndarray, b: np.ndarray, start: int, stop: int, t: np.ndarray) -> None:
    """QR of ``[a[start:stop, start:stop]; b[:, start:stop]]`` in place (``l = 0``).

    a: (N, N) upper triangular block read and written; b: (M, N), its columns
    ``start:stop`` replaced by the reflectors V; t: (nb, stop - start) receives
    the block reflectors' triangular factors, ``nb = t.shape[0]``.
    """
    width, rows, nb = stop - start, b.shape[0], t.shape[0]
    work = np.empty(nb * max(width, 1), dtype=a.dtype)
    info = _c_int(0)
    _routine(_prefix(a.dtype) + "tpqrt", 12)(
        _ref(rows), _ref(width), _ref(0), _ref(nb),
        _at(a, start, start), _ref(_leading(a)),
        _at(b, 0, start), _ref(_leading(b)),
        _at(t, 0, 0), _ref(_leading(t)),
        ctypes.c_void_p(work.ctypes.data),
        ctypes.byref(info),
    )  # fmt: skip
    if info.value != 0:  # only for invalid arguments
        raise RuntimeError(f"LAPACK ?tpqrt returned info = {info.value}")


def tpmqrt_transposed(
    v: np.ndarray, t: np.ndarray, a: np.ndarray, b: np.ndarray, rows: slice, cols: slice
) -> None:
    """``[a[rows, cols]; b[:, cols]] <- Q^T [a[rows, cols]; b[:, cols]]`` in place.

    Q is the product of the reflectors that :func:`tpqrt` left in ``v``
    (M x k, with ``k = rows.stop - rows.start``) and ``t`` (nb x k).
    """
    k = rows.stop - rows.start
    count = cols.stop - cols.start
    nb = t.shape[0]
    work = np.empty(nb * max(count, 1), dtype=a.dtype)
    info = _c_int(0)
    _routine(_prefix(a.dtype) + "tpmqrt", 17)(
        ctypes.c_char_p(b"L"), ctypes.c_char_p(b"T"),
        _ref(b.shape[0]), _ref(count), _ref(k), _ref(0), _ref(nb),
        _at(v, 0, 0), _ref(_leading(v)),
        _at(t, 0, 0), _ref(_leading(t)),
        _at(a, rows.start, cols.start), _ref(_leading(a)),
        _at(b, 0, cols.start), _ref(_leading(b)),
        ctypes.c_void_p(work.ctypes.data),
        ctypes.byref(info),
    )  # fmt: skip
    if info.value != 0:
        raise RuntimeError(f"LAPACK ?tpmqrt returned info = {info.value}")
