"""Streaming (non-temporal) stores for the compiled loops.

A loop that writes a large array it will not read again soon (the states and
new values the delta rules keep for their backward pass) pays for every line
twice with ordinary stores: the CPU first reads the line into its cache
(read for ownership), then writes it back.  A non-temporal store of a whole
aligned 64-byte line skips the read and the cache.  :func:`stream_rows`
copies rows that way, with ordinary stores for the parts of a row outside
whole aligned lines; LLVM emits the CPU's own instructions (``movntdq`` on
x86-64, ``stnp`` on AArch64).  Streaming stores are weakly ordered:
:func:`stream_fence` orders them before any later store, and a loop calls
it before it returns, so that another thread reading the array after the
loop sees every value.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import jit

#: Bytes in a cache line (see :mod:`dplr._runtime.prefetch`).
LINE = 64


@intrinsic
def _stream_lines(typingctx, destination, source, lines):
    """Copy ``lines`` lines of 64 bytes from address ``source`` (any alignment) to
    address ``destination`` (64-byte aligned) with non-temporal stores."""

    def codegen(context, builder, signature, args):
        dst, src, count = args
        line = ir.VectorType(ir.IntType(32), LINE // 4)
        not_temporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, count) as loop:
            offset = builder.mul(loop.index, ir.Constant(dst.type, LINE))
            value = builder.load(builder.inttoptr(builder.add(src, offset), line.as_pointer()),
                                 align=1)  # fmt: skip
            store = builder.store(
                value, builder.inttoptr(builder.add(dst, offset), line.as_pointer()), align=LINE
            )
            store.set_metadata("nontemporal", not_temporal)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, types.intp), codegen


@intrinsic
def _fence(typingctx):
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@jit(nogil=True)
def stream_fence() -> None:
    """Order every streaming store before any later load or store of this thread."""
    _fence()


@jit(nogil=True)
def stream_rows(destination: np.ndarray, source: np.ndarray) -> None:
    """``destination[:] = source`` for 2-D arrays of one dtype and shape whose rows are
    contiguous, the whole 64-byte lines of each destination row by streaming stores.

    Call :func:`stream_fence` before another thread reads ``destination``.
    """
    rows, cols = destination.shape
    size = destination.itemsize
    for r in range(rows):
        dst, src = destination[r], source[r]
        address = dst.ctypes.data
        # Entries before the first whole line (all of them if the row is not even
        # aligned to its entries, which NumPy allows for views of raw buffers).
        head = cols if address % size else min(((-address) % LINE) // size, cols)
        lines = (cols - head) * size // LINE
        for c in range(head):
            dst[c] = src[c]
        if lines > 0:
            _stream_lines(address + head * size, src.ctypes.data + head * size, lines)
        for c in range(head + lines * LINE // size, cols):
            dst[c] = src[c]
