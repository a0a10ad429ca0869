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
    workspace.MIN_RECYCLED_BYTES = 1024
    kept = workspace.recycled((1000,), np.float64)  # held in the parent
    assert workspace._buffers() and workspace._recycled
    def child():
        empty = not workspace._buffers() and not workspace._recycled
        workspace.recycled((1000,), np.float64)  # and the lock is usable in the child
        os._exit(0 if empty else 3)
    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    print(p.exitcode)
    """
)


def test_a_forked_child_starts_without_the_parents_buffers_or_kept_arrays():
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


# ------------------------------------------------------------ arrays handed out
@pytest.fixture
def small_recycled(monkeypatch):
    """Recycle arrays from 1 KiB on, keep at most two of 32 KiB (each with its alignment)."""
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 1024)
    monkeypatch.setattr(workspace, "MAX_RECYCLED_BYTES", 64 * 1024 + 2 * workspace.ALIGNMENT)


def test_recycled_arrays_start_on_a_cache_line(small_recycled):
    """Whether new or reused, and for every size (streaming stores write whole lines)."""
    held = [workspace.recycled((n,), np.float32) for n in (300, 301, 1000, 300)]
    assert all(a.ctypes.data % workspace.ALIGNMENT == 0 for a in held)
    del held[0]
    again = workspace.recycled((300,), np.float32)
    assert again.ctypes.data % workspace.ALIGNMENT == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recycled_has_the_shape_and_dtype_asked_for(small_recycled, dtype):
    a = workspace.recycled((4, 8, 16), dtype)
    assert a.shape == (4, 8, 16) and a.dtype == dtype and a.flags.c_contiguous
    a[...] = 3
    assert (a == 3).all()


def test_recycled_memory_is_reused_only_once_nothing_refers_to_it(small_recycled):
    a = workspace.recycled((64, 16), np.float64)
    address = a.ctypes.data
    held = a[3:5]  # a view keeps the memory taken
    del a
    b = workspace.recycled((64, 16), np.float64)
    assert b.ctypes.data != address and not np.shares_memory(b, held)
    del held, b
    c = workspace.recycled((16, 64), np.float64)  # same size, other shape: the first buffer
    assert c.ctypes.data == address


def test_a_torch_tensor_on_recycled_memory_keeps_it_taken(small_recycled):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(workspace.recycled((64, 16), np.float64)).view(16, 64)[2:]
    t.fill_(1.0)
    again = workspace.recycled((64, 16), np.float64)
    again[...] = 0.0
    assert bool((t == 1.0).all())  # untouched: the new array has its own memory
    address = t.data_ptr()
    del t
    assert workspace.recycled((64, 16), np.float64).ctypes.data == address - 2 * 64 * 8


def test_small_arrays_are_not_kept_and_the_cap_drops_free_buffers(small_recycled):
    workspace.recycled((10,), np.float64)  # 80 bytes: below the minimum
    assert not workspace._recycled
    a = workspace.recycled((4096,), np.float64)  # 32 KiB, kept
    b = workspace.recycled((4096,), np.float64)  # a is taken: a second 32 KiB buffer
    assert len(workspace._recycled) == 2
    c = workspace.recycled((2048,), np.float64)  # over the cap with a, b taken: not kept
    assert len(workspace._recycled) == 2 and not any(np.shares_memory(c, x) for x in (a, b))
    del b
    d = workspace.recycled((2048,), np.float64)  # the free 32 KiB buffer makes room
    room = workspace.ALIGNMENT
    assert sorted(x.nbytes for x in workspace._recycled) == [16384 + room, 32768 + room]
    assert not np.shares_memory(a, d)
    dplr.empty_cache()
    assert not workspace._recycled


def test_without_reliable_reference_counts_nothing_is_kept(small_recycled, monkeypatch):
    monkeypatch.setattr(workspace, "_COUNTS_REFERENCES", False)
    a = workspace.recycled((4096,), np.float64)
    assert a.shape == (4096,) and not workspace._recycled


def test_threads_never_share_recycled_memory(small_recycled):
    errors = []

    def work():
        for _ in range(200):
            a = workspace.recycled((512,), np.float64)
            a[...] = threading.get_ident()  # exact in float64 (below 2^53)
            if not (a == threading.get_ident()).all():
                errors.append("another thread wrote into this array")

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


def test_attention_outputs_of_successive_calls_do_not_share_memory(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 1024)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=gen) for _ in range(3))
    g, beta = -torch.rand(1, 64, 2, generator=gen), torch.rand(1, 64, 2, generator=gen)
    first, _ = dplr.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    assert any(np.shares_memory(first.numpy(), x) for x in workspace._recycled)
    kept = first.clone()
    second, _ = dplr.gated_delta_rule(q, k, v, g * 0.5, beta, use_qk_l2norm=True)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept)  # the first output is intact
    del first
    third, _ = dplr.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    assert torch.equal(third, kept)  # recycled memory gives the same values


def test_a_training_loop_reuses_what_autograd_saved(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 1024)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    g = (-torch.rand(1, 96, 2, generator=gen)).requires_grad_()
    beta = torch.rand(1, 96, 2, generator=gen).requires_grad_()
    grads, sizes = [], []
    for _ in range(3):
        o, s = dplr.gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        grads.append(torch.autograd.grad((o.square().sum() + s.sum(),), (q, k, v, g, beta)))
        del o, s
        grads[-1] = [x.clone() for x in grads[-1]]
        sizes.append(len(workspace._recycled))
    # the second step's arrays took the first step's memory, and so on
    assert sizes[0] > 0 and sizes[1] == sizes[2]
    for again in grads[1:]:
        for a, b in zip(grads[0], again, strict=True):
            assert torch.equal(a, b)
