"""Streaming stores: every entry of the destination written, nothing around it touched."""

import threading

import numpy as np
import pytest

from dplr._runtime.jit import jit
from dplr._runtime.stream import LINE, stream_fence, stream_rows


@jit(nogil=True)
def _copy(destination, source):
    stream_rows(destination, source)
    stream_fence()


def _padded_view(dtype, rows: int, cols: int, offset: int):
    """A (rows, cols) view with a row stride of cols + 9 entries, ``offset`` entries into
    a zeroed buffer, and the buffer's mask of the view's entries."""
    stride = cols + 9
    buffer = np.zeros(rows * stride + 16, dtype)
    inside = np.zeros(buffer.shape, bool)
    view = buffer[offset : offset + rows * stride].reshape(rows, stride)[:, :cols]
    inside[offset : offset + rows * stride].reshape(rows, stride)[:, :cols] = True
    return buffer, view, inside


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (3, 5), (7, 33), (4, 128), (32, 128)])
@pytest.mark.parametrize("offset", [0, 1, 3, 8, 15])
def test_rows_are_copied_whatever_their_alignment(dtype, shape, offset):
    """Rows shorter than a line, not starting on one, not ending on one, and aligned."""
    buffer, view, inside = _padded_view(dtype, *shape, offset)
    source = np.random.default_rng(sum(shape) + offset).standard_normal(shape).astype(dtype)
    before = buffer.copy()
    _copy(view, source)
    np.testing.assert_array_equal(view, source)
    np.testing.assert_array_equal(buffer[~inside], before[~inside])


def test_rows_not_aligned_to_their_entries_take_ordinary_stores():
    """A float32 view two bytes into a buffer (NumPy allows it): no streaming store
    may land off a line, so the whole row is copied entry by entry."""
    raw = np.zeros(4 * 64 * 3 + 8, np.uint8)
    view = np.frombuffer(raw, np.float32, count=64 * 3, offset=2).reshape(3, 64)
    assert not view.flags.aligned
    source = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    _copy(view, source)
    np.testing.assert_array_equal(view, source)
    assert not raw[:2].any() and not raw[2 + view.nbytes :].any()


def test_lines_streamed_by_one_thread_are_read_by_another():
    """The fence: a reader started after the writer returns sees every value."""
    rows, cols = 64, 4 * LINE // 4
    destination = np.zeros((rows, cols), np.float32)
    source = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    writer = threading.Thread(target=_copy, args=(destination, source))
    writer.start()
    writer.join()
    seen = []
    reader = threading.Thread(target=lambda: seen.append(destination.copy()))
    reader.start()
    reader.join()
    np.testing.assert_array_equal(seen[0], source)
