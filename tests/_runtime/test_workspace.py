"""Per-thread scratch memory kept between calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import dplr
from dplr._runtime import workspace


@pytest.fixture(autouse=True)
def clean():
    workspace.empty_cache()
    yield
    workspace.empty_cache()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8])
def test_scratch_has_the_shape_and_dtype_asked_for(dtype):
    a = workspace.scratch("x", (3, 4, 5), dtype)
    assert a.shape == (3, 4, 5) and a.dtype == dtype and a.flags.c_contiguous
    a[...] = 7  # writable in full
    assert (a == 7).all()


def test_a_name_reuses_its_buffer_and_grows_it():
    small = workspace.scratch("x", (10,), np.float64)
    again = workspace.scratch("x", (5, 2), np.float64)
    assert np.shares_memory(small, again)  # kept: no new allocation
    other = workspace.scratch("y", (10,), np.float64)
    assert not np.shares_memory(small, other)  # names are independent
    grown = workspace.scratch("x", (1000,), np.float64)
    assert grown.nbytes == 8000 and workspace._buffers()["x"].nbytes >= 8000


def test_each_thread_has_its_own_buffers():
    mine = workspace.scratch("x", (100,), np.float64)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(workspace.scratch("x", (100,), np.float64)))
    t.start()
    t.join()
    assert not np.shares_memory(mine, theirs[0])


def test_empty_cache_frees_and_large_requests_are_not_kept(monkeypatch):
    workspace.scratch("x", (100,), np.float64)
    assert workspace._buffers()
    dplr.empty_cache()
    assert not workspace._buffers()
    monkeypatch.setattr(workspace, "MAX_CACHED_BYTES", 799)
    big = workspace.scratch("x", (100,), np.float64)  # 800 bytes: above the cap
    assert big.shape == (100,) and not workspace._buffers()


_FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os
    import numpy as np
    from dplr._runtime import workspace
    workspace.scratch("blocks", (1000,), np.float64)
    assert workspace._buffers()
    def child():
        os._exit(0 if not workspace._buffers() else 3)
    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    print(p.exitcode)
    """
)


def test_a_forked_child_starts_without_the_parents_buffers():
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
