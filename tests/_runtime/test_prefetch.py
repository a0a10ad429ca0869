"""The prefetch hints: they compile, read nothing back and write nothing, on any view."""

import numpy as np
import pytest

from dplr._runtime.jit import jit
from dplr._runtime.prefetch import (
    prefetch_contiguous_outer,
    prefetch_entries,
    prefetch_rows,
)


@jit(nogil=True)
def _hint_all(a, col_start, col_stop):
    prefetch_rows(a, col_start, col_stop)
    prefetch_entries(a[:, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "view",
    [
        lambda x: x,  # whole array
        lambda x: x[:, 3, :],  # rows a page apart, as a chunk of one head
        lambda x: x[5:6, 0, :],  # one row
        lambda x: x[:0, 0, :],  # no rows
        lambda x: x[-2:, -1, -1:],  # the last entry of the buffer: a hint past it never faults
    ],
)
def test_hints_leave_every_value_as_it_was(dtype, view):
    x = np.random.default_rng(0).standard_normal((40, 8, 128)).astype(dtype)
    before = x.copy()
    a = view(x)
    a = a.reshape(a.shape[0], -1) if a.ndim == 3 else a
    _hint_all(a, 0, a.shape[1])
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (3, 5), (128, 128)])
def test_the_outer_cache_hint_leaves_a_contiguous_block_as_it_was(shape):
    """A block of any size (empty, smaller than a line, not a whole number of lines)."""
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    before = x.copy()
    prefetch_contiguous_outer(x[1])
    np.testing.assert_array_equal(x, before)
