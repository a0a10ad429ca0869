"""Context parallelism: the delta rules and KDA over a sequence split across ranks.

Each rank of a ``torch.distributed`` process group holds a contiguous slice
of the sequence.  A slice's state map is affine in its incoming state,
``S_out = M S_in + E``; one pass of the single-process kernels with values
``[v | 0]`` and initial state ``[0 | I]`` returns ``[E | M]`` as its final
state and, as its outputs, ``[o_E | scale * M_t^T q_t]``.  The ranks
all-gather ``(M, E)``, fold the prefix, and each rank's outputs follow from
its true incoming state with one product:
``o_t = o_E,t + S_in^T (scale * M_t^T q_t)`` (``docs/distributed.md``).
The three public functions differ only in the single-process function they
run: ``M`` is a K x K matrix per head in every case (with KDA's per-channel
decay as with a scalar one), which the columns ``[0 | I]`` carry and the fold
composes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..attention import delta_rule as _delta_rule
from ..attention import gated_delta_rule as _gated_delta_rule
from ..attention import kda as _kda

__all__ = ["delta_rule", "gated_delta_rule", "kda"]


def delta_rule(
    q: Any, k: Any, v: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, group: Any = None,
) -> tuple[Any, Any]:  # fmt: skip
    """:func:`dplr.delta_rule` over a sequence split across the ranks of ``group``.

    Every rank of ``group`` calls this at the same point with its contiguous
    slice of the sequence; rank r holds the tokens after those of ranks
    0 .. r-1.  Slices may differ in length, and may be empty.

    Parameters
    ----------
    q, k : (B, T_r, H, K) torch.Tensor
        This rank's queries and keys (``T_r`` may differ between ranks, or be 0).
    v : (B, T_r, HV, V) torch.Tensor
        This rank's values (HV a multiple of H: grouped value heads, as in
        :func:`dplr.delta_rule`).
    beta : (B, T_r, HV) torch.Tensor
        This rank's write strengths.
    scale, chunk_size, use_qk_l2norm
        As in :func:`dplr.delta_rule`; the same on every rank.
    initial_state : (B, HV, K, V) torch.Tensor, optional
        The state before the first token of rank 0: the same tensor (values)
        on every rank, or None on every rank.
    output_final_state : bool, default False
        Also return the state after the last token of the last rank; every
        rank receives the same tensor.
    cu_seqlens : None
        Packed sequences are not supported across ranks: passing anything
        but None raises ``ValueError`` on every rank.
    group : torch.distributed.ProcessGroup, optional
        The ranks that share the sequence, in sequence order (default: the
        world).

    Returns
    -------
    o : (B, T_r, HV, V) torch.Tensor
        This rank's outputs, equal to its slice of the single-process outputs.
    final_state : (B, HV, K, V) torch.Tensor or None
        The state after the whole sequence if ``output_final_state``.

    Raises
    ------
    RuntimeError
        torch.distributed is not initialised, or another rank failed (every
        rank raises; the failing ones raise their own error).
    ValueError
        Bad shapes, NaN or Inf, ``cu_seqlens`` given, or arguments that
        differ between ranks (B, H, K, V, dtype, scale, ...).
    TypeError
        Inputs that are not torch tensors.

    Notes
    -----
    Per rank: one single-process pass over its slice with K extra value
    columns (about ``1 + K / (K + V)`` times the flops of the plain pass,
    plus one ``T_r K V`` product), an all-gather of ``B H K (K + V)``
    numbers from each rank and a fold of ``world`` small products.  The
    transition maps are kept in float32 or wider whatever the input dtype.

    Gradients reach q, k, v, beta and ``initial_state``.  Each rank's
    gradients are its slice of the single-process gradients of the sum of
    all ranks' losses; the ``initial_state`` gradients of the ranks sum to
    the single-process one (all-reduce them, as for any replicated
    parameter).  The backward runs one all-reduce of the same size as the
    forward's all-gather, so every rank must run its backward through its
    outputs.  A loss that uses the final state on every rank counts it once
    per rank.

    Examples
    --------
    Every rank runs the same code with its own slice (under ``torchrun``,
    ``dist.init_process_group("gloo")`` reads the rendezvous from the
    environment).  Here, a group of one rank:

    >>> import os, tempfile, torch, torch.distributed as dist, dplr, dplr.distributed
    >>> store = "file://" + os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> q, k = torch.randn(2, 1, 100, 2, 8, dtype=torch.float64)
    >>> v, beta = torch.randn(1, 100, 2, 4, dtype=torch.float64), torch.rand(1, 100, 2)
    >>> o, s = dplr.distributed.delta_rule(q, k, v, beta, use_qk_l2norm=True,
    ...                                    output_final_state=True)
    >>> o1, s1 = dplr.delta_rule(q, k, v, beta, use_qk_l2norm=True, output_final_state=True)
    >>> dist.destroy_process_group()
    >>> bool(torch.allclose(o, o1) and torch.allclose(s, s1))
    True
    """
    inputs = {"q": q, "k": k, "v": v, "beta": beta}
    options = {"scale": scale, "chunk_size": chunk_size, "use_qk_l2norm": use_qk_l2norm}
    return _context_parallel(
        "delta_rule", _delta_rule, inputs, options, initial_state, output_final_state,
        cu_seqlens, group,
    )  # fmt: skip


def gated_delta_rule(
    q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, group: Any = None,
) -> tuple[Any, Any]:  # fmt: skip
    """:func:`dplr.gated_delta_rule` over a sequence split across the ranks of ``group``.

    Parameters
    ----------
    q, k, v, beta
        As in :func:`delta_rule`: this rank's slice.
    g : (B, T_r, HV) torch.Tensor
        This rank's log decay, ``g <= 0``.
    scale, initial_state, output_final_state, cu_seqlens, chunk_size, use_qk_l2norm, group
        As in :func:`delta_rule`.

    Returns
    -------
    o : (B, T_r, HV, V) torch.Tensor
    final_state : (B, HV, K, V) torch.Tensor or None

    Raises
    ------
    RuntimeError, ValueError, TypeError
        As :func:`delta_rule`, and ``ValueError`` for positive ``g``.

    Notes
    -----
    As :func:`delta_rule`; gradients also reach g.  The map ``M`` of a slice
    holds its total decay ``exp(sum g)``: a slice with strong decay forgets
    what came before it, exactly as in one process.

    Examples
    --------
    Called like :func:`delta_rule`, with ``g`` before ``beta`` (a group of one rank here):

    >>> import os, tempfile, torch, torch.distributed as dist, dplr, dplr.distributed
    >>> store = "file://" + os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> q, k, v = torch.randn(3, 1, 50, 1, 4)
    >>> g, beta = -torch.rand(1, 50, 1), torch.rand(1, 50, 1)
    >>> o, _ = dplr.distributed.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    >>> dist.destroy_process_group()
    >>> bool(torch.allclose(o, dplr.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)[0]))
    True
    """
    inputs = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    options = {"scale": scale, "chunk_size": chunk_size, "use_qk_l2norm": use_qk_l2norm}
    return _context_parallel(
        "gated_delta_rule", _gated_delta_rule, inputs, options, initial_state, output_final_state,
        cu_seqlens, group,
    )  # fmt: skip


def kda(
    q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, group: Any = None,
) -> tuple[Any, Any]:  # fmt: skip
    """:func:`dplr.kda` (Kimi Delta Attention) over a sequence split across the ranks of ``group``.

    Parameters
    ----------
    q, k, v, beta
        As in :func:`delta_rule`: this rank's slice (``v`` and ``beta`` with
        HV value heads, a multiple of the H heads of ``q`` and ``k``).
    g : (B, T_r, HV, K) torch.Tensor
        This rank's log decay of each key channel, ``g <= 0`` (``-inf``
        resets that channel).
    scale, initial_state, output_final_state, cu_seqlens, chunk_size, use_qk_l2norm, group
        As in :func:`delta_rule`.

    Returns
    -------
    o : (B, T_r, HV, V) torch.Tensor
    final_state : (B, HV, K, V) torch.Tensor or None

    Raises
    ------
    RuntimeError, ValueError, TypeError
        As :func:`delta_rule`, and ``ValueError`` for positive or NaN ``g``.

    Notes
    -----
    As :func:`delta_rule`; gradients also reach g.  The map ``M`` of a slice
    is the product of its tokens' transitions
    ``(I - beta_t k_t k_t^T) Diag(exp g_t)``, a general K x K matrix per
    head, carried by the same K extra value columns and composed by the same
    fold; a ``-inf`` decay is an exact zero in it, as in one process.  The
    per-token cost and the communication are those of
    :func:`delta_rule`.

    Examples
    --------
    Called like :func:`gated_delta_rule`, with ``g`` per key channel (a
    group of one rank here):

    >>> import os, tempfile, torch, torch.distributed as dist, dplr, dplr.distributed
    >>> store = "file://" + os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> q, k = torch.randn(2, 1, 50, 1, 4)
    >>> v, beta = torch.randn(1, 50, 2, 3), torch.rand(1, 50, 2)   # 2 value heads
    >>> g = -torch.rand(1, 50, 2, 4)
    >>> o, s = dplr.distributed.kda(q, k, v, g, beta, use_qk_l2norm=True,
    ...                             output_final_state=True)
    >>> dist.destroy_process_group()
    >>> o1, s1 = dplr.kda(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True)
    >>> bool(torch.allclose(o, o1, atol=1e-6) and torch.allclose(s, s1, atol=1e-6))
    True
    """
    inputs = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    options = {"scale": scale, "chunk_size": chunk_size, "use_qk_l2norm": use_qk_l2norm}
    return _context_parallel(
        "kda", _kda, inputs, options, initial_state, output_final_state, cu_seqlens, group,
    )  # fmt: skip


# ------------------------------------------------------------------------------ the driver
#: A single-process rule: ``(*inputs, initial_state=, output_final_state=, **options)``.
Single = Callable[..., tuple[Any, Any]]


def _context_parallel(name: str, single: Single, inputs: dict[str, Any], options: dict,
                      initial_state: Any, output_final_state: bool, cu_seqlens: Any,
                      group: Any) -> tuple[Any, Any]:  # fmt: skip
    """Validate, run the slice once with ``[v | 0]`` from ``[0 | I]``, agree, fold, combine."""
    from . import _collective as coll

    world, rank = coll.require_group(name, group)
    local: tuple | None = None
    error: BaseException | None = None
    try:
        coll.check_slice(inputs, initial_state, cu_seqlens)
        local = _slice_maps(single, inputs, options, initial_state)
    except Exception as exc:  # every rank must hear of it before the exchange
        error = exc
    meta = coll.describe(inputs, initial_state, output_final_state, options) if local else None
    coll.agree(name, group, rank, world, meta, error, inputs)
    o_aug, maps, s0 = local
    s_in, s_final = coll.prefix_fold(maps, s0, group, rank, world)
    vdim = inputs["v"].shape[-1]
    dtype = inputs["v"].dtype
    o = o_aug[..., :vdim] + _apply_state(o_aug[..., vdim:], s_in)
    return o.to(dtype), (s_final.to(dtype) if output_final_state else None)


def _slice_maps(single: Single, inputs: dict[str, Any], options: dict, initial_state: Any):
    """One single-process pass of this slice: outputs ``[o_E | scale M_t^T q_t]`` and ``[E | M]``.

    ``inputs`` are ``single``'s positional arguments in order, ``v`` among
    them; ``v`` is replaced by ``[v | 0]`` and the initial state is ``[0 | I]``.
    Everything runs in float32 or wider (``wide``), so that the transition
    maps keep their precision whatever the input dtype.
    """
    import torch

    v = inputs["v"]
    wide = torch.promote_types(v.dtype, torch.float32)
    x = {key: t.to(wide) for key, t in inputs.items()}
    batch, length, heads, vdim = v.shape
    kdim = x["k"].shape[-1]
    zeros = v.new_zeros((batch, length, heads, kdim), dtype=wide)
    eye = torch.eye(kdim, dtype=wide, device=v.device).expand(batch, heads, kdim, kdim)
    start = torch.cat([v.new_zeros((batch, heads, kdim, vdim), dtype=wide), eye], -1)
    x["v"] = torch.cat([x["v"], zeros], -1)

    def run(*tensors: Any) -> tuple[Any, Any]:
        *args, state = tensors
        return single(*args, initial_state=state, output_final_state=True, **options)

    o_aug, maps = _without_subnormals(run, *x.values(), start)
    s0 = None if initial_state is None else initial_state.to(wide)
    if s0 is None:
        s0 = v.new_zeros((batch, heads, kdim, vdim), dtype=wide)
    return o_aug, maps, s0


def _apply_state(mq: Any, state: Any) -> Any:
    """``S^T (scale M_t^T q_t)`` for every token: (B, T, H, K) x (B, H, K, V) -> (B, T, H, V)."""
    import torch

    return torch.einsum("bthk,bhkv->bthv", mq, state)


# -------------------------------------------------------------- subnormal numbers
# The K extra columns start from the identity and receive no values, so they
# only decay: over a long slice their entries fall below the smallest normal
# number (float32: 1.2e-38, e^-87), and arithmetic on subnormal numbers is
# 5-20x slower on x86.  Such entries are far below the rounding of every
# result they reach, so the slice's pass runs with subnormal numbers
# flushed to zero, forward and backward, on the calling thread and on dplr's
# worker threads (the compiled forward runs there).
def _without_subnormals(run: Callable[..., tuple[Any, Any]], *tensors: Any) -> tuple[Any, Any]:
    """``run(*tensors)`` with subnormals flushed to zero, its backward too."""
    import torch

    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with _flushed():
            return run(*tensors)
    return _flushed_pass_function().apply(run, *tensors)


def _flushing() -> bool:
    """Whether this thread flushes subnormal results to zero: halve the smallest normal."""
    import torch

    return float(torch.tensor([2.0**-126], dtype=torch.float32) * 0.5) == 0.0


def _switch_on() -> bool:
    """Flush subnormals on this thread; whether it was off (and is now switched)."""
    import torch

    # set_flush_denormal returns False, and changes nothing, where the CPU cannot.
    return not _flushing() and torch.set_flush_denormal(True)


def _on_every_worker(fn: Callable[[], Any]) -> list[Any]:
    """``fn()`` once on each of dplr's worker threads (none from inside one of them)."""
    from .._runtime import threads

    if threading.current_thread().name.startswith("dplr"):
        return []
    executor = threads.pool()
    # The pool's own size: DPLR_NUM_THREADS may have changed since it started.
    count = getattr(executor, "_max_workers", threads.num_workers())
    meet = threading.Barrier(count)

    def task(_: int) -> Any:
        result = fn()
        meet.wait()  # hold this thread until every worker has run one task
        return result

    return list(executor.map(task, range(count)))


@contextlib.contextmanager
def _flushed() -> Iterator[None]:
    """Flush subnormal numbers to zero on this thread and dplr's workers, restore after.

    The setting is per thread (the x86 MXCSR register); threads started
    while it is on inherit it.
    """
    import torch

    workers = _on_every_worker(_switch_on)  # first: threads it starts copy this one's setting
    here = _switch_on()
    try:
        yield
    finally:
        if workers and all(workers):  # (were some on already, all stay on)
            _on_every_worker(lambda: torch.set_flush_denormal(False))
        if here:
            torch.set_flush_denormal(False)


_FLUSHED_PASS: Any = None


def _flushed_pass_function() -> Any:
    """The autograd Function of :func:`_without_subnormals` (made on first use)."""
    global _FLUSHED_PASS
    if _FLUSHED_PASS is None:
        _FLUSHED_PASS = _make_flushed_pass()
    return _FLUSHED_PASS


def _make_flushed_pass() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    class _FlushedPass(torch.autograd.Function):
        """Forward: ``run`` on detached copies, keeping its graph.  Backward: through that
        graph, both with subnormals flushed; nothing is recomputed."""

        @staticmethod
        def forward(ctx, run, *tensors):
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            with torch.enable_grad(), _flushed():
                outputs = run(*leaves)
            ctx.graph = (leaves, outputs)
            return tuple(out.detach() for out in outputs)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            leaves, outputs = ctx.graph
            del ctx.graph
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            pairs = [(out, g) for out, g in zip(outputs, grads, strict=True) if out.requires_grad]
            if not pairs:  # an empty slice: nothing depends on the inputs
                return (None, *(None for _ in leaves))
            with _flushed():
                found = torch.autograd.grad(
                    [out for out, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
                )
            found = iter(found)
            return (None, *(next(found) if leaf.requires_grad else None for leaf in leaves))

    return _FlushedPass
