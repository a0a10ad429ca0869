"""The collective steps of context parallelism: checks, agreement, the prefix fold.

Order of events on every rank (so that no rank waits for one that raised):

1. :func:`require_group` (no communication): torch.distributed is initialised.
2. The rank checks its own slice and runs its pass; any exception is held.
3. :func:`agree`: one all-gather of a few numbers per rank (an ok flag and
   the shapes and options).  If any rank failed, or the ranks disagree,
   every rank raises here, before the exchange of the maps.
4. :func:`prefix_fold`: the all-gather of ``[E | M]``, the fold, and in the
   backward one all-reduce of the transposed maps' products.
"""

from __future__ import annotations

import math
from typing import Any

#: What every rank must agree on, in the order :func:`describe` lists it.
FIELDS = (
    "B", "H", "value heads", "K", "V", "dtype", "initial_state given",
    "output_final_state", "requires grad", "use_qk_l2norm", "scale given", "scale",
    "chunk_size",
)  # fmt: skip

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def require_group(name: str, group: Any) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``RuntimeError`` if torch.distributed is not up."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"dplr.distributed.{name} needs an initialised torch.distributed process group: "
            "call torch.distributed.init_process_group(...) on every rank first "
            "(torchrun sets the environment it reads)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process is not a member of 'group' ({group!r})")
    return dist.get_world_size(group), rank


def check_slice(inputs: dict[str, Any], initial_state: Any, cu_seqlens: Any) -> None:
    """Types and shapes of one rank's slice (the single-process call checks the rest)."""
    import torch

    if cu_seqlens is not None:
        raise ValueError(
            "'cu_seqlens' is not supported across ranks: give each sequence its own batch "
            "row (B > 1, padded) or run packed sequences with dplr.delta_rule on one rank"
        )
    named = {**inputs, "initial_state": initial_state}
    for key, x in named.items():
        if x is None and key == "initial_state":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{key!r} must be a torch.Tensor; got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{key!r} must be a floating tensor; got dtype {x.dtype}")
    q, v = inputs["q"], inputs["v"]
    if q.ndim != 4:
        raise ValueError(f"'q' must have shape (B, T_r, H, K); got shape {tuple(q.shape)}")
    heads = q.shape[2]
    if v.ndim != 4 or tuple(v.shape[:2]) != tuple(q.shape[:2]) or v.shape[2] % max(heads, 1):
        raise ValueError(
            f"'v' must have shape (B, T_r, HV, V) with (B, T_r) = {tuple(q.shape[:2])} like q "
            f"and HV a multiple of H = {heads}; got shape {tuple(v.shape)}"
        )
    batch, _, _, kdim = q.shape
    want = (batch, v.shape[2], kdim, v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(
            f"'initial_state' must have shape (B, HV, K, V) = {want}; "
            f"got shape {tuple(initial_state.shape)}"
        )


def describe(inputs: dict[str, Any], initial_state: Any, output_final_state: bool,
             options: dict[str, Any]) -> list[float]:  # fmt: skip
    """The numbers of :data:`FIELDS` for this rank."""
    import torch

    q, v = inputs["q"], inputs["v"]
    tensors = [*inputs.values(), initial_state]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    dtype = str(v.dtype).removeprefix("torch.")
    scale = options.get("scale")
    return [
        q.shape[0], q.shape[2], v.shape[2], q.shape[3], v.shape[3],
        _DTYPES.index(dtype) if dtype in _DTYPES else -1, initial_state is not None,
        bool(output_final_state), grad, bool(options.get("use_qk_l2norm")),
        scale is not None, 0.0 if scale is None else float(scale),
        options.get("chunk_size") or 0,
    ]  # fmt: skip


def agree(name: str, group: Any, rank: int, world: int, meta: list[float] | None,
          error: BaseException | None, inputs: dict[str, Any]) -> None:  # fmt: skip
    """All-gather an ok flag and :func:`describe`'s numbers; raise on every rank if needed."""
    import torch
    import torch.distributed as dist

    row = torch.full((1 + len(FIELDS),), math.nan, dtype=torch.float64)
    row[0] = 0.0 if error is not None or meta is None else 1.0
    if meta is not None:
        row[1:] = torch.tensor([float(m) for m in meta], dtype=torch.float64)
    device = _flag_device(group, inputs.get("v"))
    parts = [torch.empty_like(row, device=device) for _ in range(world)]
    dist.all_gather(parts, row.to(device), group=group)
    table = torch.stack(parts).cpu()
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r, 0] != 1.0]
    if failed:
        raise RuntimeError(
            f"dplr.distributed.{name}: rank(s) {failed} of {world} raised before the exchange "
            f"(see their errors); rank {rank} stopped too"
        )
    for i, field in enumerate(FIELDS):
        column = table[:, 1 + i]
        if not bool((column == column[0]).all()):
            raise ValueError(
                f"dplr.distributed.{name}: {field!r} must be the same on every rank; "
                f"got {column.tolist()} on ranks 0..{world - 1}"
            )


def prefix_fold(maps: Any, s0: Any, group: Any, rank: int, world: int) -> tuple[Any, Any]:
    """This rank's incoming state and the final state, from every rank's ``[E | M]``.

    ``maps`` : (B, H, K, V + K), this rank's ``[E | M]``; ``s0`` : (B, H, K, V).
    Returns ``(S_rank, S_world)`` with ``S_0 = s0`` and ``S_{j+1} = M_j S_j + E_j``.
    Differentiable with respect to both (see :class:`_PrefixFold`).
    """
    return _prefix_fold_function().apply(maps, s0, group, rank, world)


def _flag_device(group: Any, like: Any) -> Any:
    import torch
    import torch.distributed as dist

    if str(dist.get_backend(group)) == "nccl":
        if isinstance(like, torch.Tensor) and like.device.type == "cuda":
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm_device(group: Any, device: Any) -> Any:
    """Where a tensor on ``device`` is exchanged: in place, or staged on the CPU for gloo."""
    import torch
    import torch.distributed as dist

    if device.type == "cpu" or str(dist.get_backend(group)) != "gloo":
        return device
    return torch.device("cpu")


def _all_gather(x: Any, group: Any, world: int) -> Any:
    """(world, *x.shape): every rank's ``x``, in rank order, on ``x``'s device."""
    import torch
    import torch.distributed as dist

    src = x.detach().to(_comm_device(group, x.device)).contiguous()
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src, group=group)
    return torch.stack(parts).to(x.device)


def _all_reduce(x: Any, group: Any) -> Any:
    import torch.distributed as dist

    buf = x.to(_comm_device(group, x.device)).contiguous()
    dist.all_reduce(buf, group=group)
    return buf.to(x.device)


_FUNCTION: Any = None


def _prefix_fold_function() -> Any:
    """The autograd Function of :func:`prefix_fold` (made on first use: torch is optional)."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _make_prefix_fold()
    return _FUNCTION


def _make_prefix_fold() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    class _PrefixFold(torch.autograd.Function):
        """Forward: all-gather ``[E | M]`` and fold.  Backward: the transposed maps in reverse.

        With ``S_{j+1} = M_j S_j + E_j`` and the gradient ``G`` of ``S_{j+1}``:
        ``dE_j = G``, ``dM_j = G S_j^T`` and ``G`` of ``S_j`` is ``M_j^T G``
        (plus whatever this rank's outputs sent to ``S_j``).  Each rank forms
        these for every j from its own gradients; one all-reduce sums them and
        rank j keeps entry j.
        """

        @staticmethod
        def forward(ctx, maps, s0, group, rank, world):
            gathered = _all_gather(maps, group, world)
            vdim = s0.shape[-1]
            states = [s0]
            for j in range(world):
                states.append(gathered[j, ..., vdim:] @ states[-1] + gathered[j, ..., :vdim])
            ctx.save_for_backward(gathered[..., vdim:], torch.stack(states[:-1]))
            ctx.fold = (group, rank, world)
            return states[rank], states[world]

        @staticmethod
        @once_differentiable
        def backward(ctx, d_in, d_final):
            transitions, prefix = ctx.saved_tensors
            group, rank, world = ctx.fold
            vdim = prefix.shape[-1]
            d_maps = transitions.new_empty((world, *prefix.shape[1:-1], vdim + prefix.shape[-2]))
            grad = d_final
            for j in reversed(range(world)):
                if j + 1 == rank:
                    grad = grad + d_in
                d_maps[j, ..., :vdim] = grad
                d_maps[j, ..., vdim:] = grad @ prefix[j].mT
                grad = transitions[j].mT @ grad
            if rank == 0:
                grad = grad + d_in
            d_maps = _all_reduce(d_maps, group)
            return d_maps[rank], grad, None, None, None

    return _PrefixFold
