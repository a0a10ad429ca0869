"""Cache-line prefetch hints for the compiled loops.

A chunk of one head in the public layout (B, T, H, K) is L rows of K
entries, each row in its own page (the row stride is H K entries), so the
CPU's own prefetchers, which follow a stream within a page, miss the first
lines of every row.  A loop that knows which rows its next chunk reads asks
for them while it computes the current chunk; the hint never waits for the
line and never faults, whatever the address.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .jit import jit

#: Bytes in a cache line of the x86-64 and ARM64 CPUs dplr runs on.
LINE = 64

#: LLVM's locality: 3 puts the line into every cache level, 2 into all but the first.
INTO_EVERY_LEVEL, INTO_OUTER_LEVELS = 3, 2


def _prefetch_intrinsic(locality: int):
    """An intrinsic ``f(address)``: LLVM's prefetch hint for reading the cache line holding
    byte ``address``, with LLVM's ``locality``."""

    def prefetch_line(typingctx, address):
        def codegen(context, builder, signature, args):
            byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [byte_ptr], fnty)
            read, level, data = (ir.Constant(i32, x) for x in (0, locality, 1))
            builder.call(fn, [builder.inttoptr(args[0], byte_ptr), read, level, data])
            return context.get_dummy_value()

        return types.void(types.intp), codegen

    return intrinsic(prefetch_line)


_prefetch_line = _prefetch_intrinsic(INTO_EVERY_LEVEL)
_prefetch_line_outer = _prefetch_intrinsic(INTO_OUTER_LEVELS)


@jit(nogil=True)
def prefetch_contiguous_outer(a: np.ndarray) -> None:
    """Prefetch every cache line of the C-contiguous ``a`` into the caches after the first.

    For a block larger than the first-level cache that the loop reads a chunk later:
    into every level, it evicted the chunk in work (the backward's 64 KB state: 3%
    slower; into the second level: 1.5-4% faster).
    """
    start = a.ctypes.data
    for address in range(start, start + a.size * a.itemsize, LINE):
        _prefetch_line_outer(address)


@jit(nogil=True)
def prefetch_rows(a: np.ndarray, col_start: int, col_stop: int) -> None:
    """Prefetch every cache line of ``a[:, col_start:col_stop]`` (2-D, rows contiguous)."""
    size = a.itemsize
    for r in range(a.shape[0]):
        start = a.ctypes.data + r * a.strides[0] + col_start * size
        for address in range(start, start + (col_stop - col_start) * size, LINE):
            _prefetch_line(address)


@jit(nogil=True)
def prefetch_entries(a: np.ndarray) -> None:
    """Prefetch the cache line of every entry of the 1-D (strided) ``a``."""
    for i in range(a.shape[0]):
        _prefetch_line(a.ctypes.data + i * a.strides[0])
