"""Hand-written gradients of the chunked product and solve (docs/algorithms.md, 1.4).

Every gradient is again a product or a solve with a matrix of the same
structure, so the backward pass costs what the forward pass costs and never
forms an n x n matrix.  The pure functions work for NumPy and torch alike; the
``torch.autograd.Function`` classes at the bottom wrap them so that torch
saves only the operands and the result, never the graph of the chunk loop.
"""

from __future__ import annotations

from .._runtime.backend import Array, TorchOps
from ._kernels import Ops, matmul, solve


def reverse_cumsum(ops: Ops, x: Array) -> Array:
    """``out[s] = sum_{m >= s} x[m]`` along the last axis (the adjoint of cumsum)."""
    return ops.flip(ops.flip(x, -1).cumsum(-1), -1)


def structure_grads(
    ops: Ops,
    q: Array,
    k: Array,
    log_decay: Array | None,
    left: Array,
    right: Array,
    chunk_size: int | None,
) -> tuple[Array, Array, Array, Array | None]:
    """Pull a dense cotangent ``dT = left @ right^T`` back onto (q, k, lam, G).

    ``T[i, j] = q_i . k_j exp(G_i - G_j)`` below the diagonal, so with
    ``S = tril(left right^T ⊙ D, -1)`` (never formed):
    ``dq = S k``, ``dk = S^T q``, ``dlam = rowdot(left, right)`` and
    ``dG = rowdot(q, dq) - rowdot(k, dk)``.  Returns ``dq, dk, dlam, dG``
    (``dG`` is with respect to the cumulative ``G``, None without decay).
    """
    zero = ops.zeros(left.shape[:-1], left)
    dq, _ = matmul(ops, left, right, zero, log_decay, k, chunk_size=chunk_size)
    dk, _ = matmul(ops, left, right, zero, log_decay, q, transpose=True, chunk_size=chunk_size)
    dlam = (left * right).sum(-1)
    dg = None if log_decay is None else (q * dq).sum(-1) - (k * dk).sum(-1)
    return dq, dk, dlam, dg


def _decay_weights(ops: Ops, log_decay: Array | None) -> tuple[Array | None, Array | None]:
    """``exp(G)`` and ``exp(G[-1] - G)`` (both <= 1), or None without decay."""
    if log_decay is None:
        return None, None
    big_g = log_decay.cumsum(-1)
    return ops.exp(big_g), ops.exp(big_g[..., -1:] - big_g)


def _scale_rows(x: Array, w: Array | None) -> Array:
    return x if w is None else x * w[..., None]


def matmul_backward(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    v: Array,
    h0: Array | None,
    dy: Array,
    *,
    transpose: bool,
    chunk_size: int | None,
):
    """Gradients of ``Y = T V + exp(G) ⊙ (Q h0)`` (or ``T^T V``).

    Returns ``dq, dk, dlam, dlog_decay, dv, dh0``.
    """
    dv, _ = matmul(ops, q, k, lam, log_decay, dy, transpose=not transpose, chunk_size=chunk_size)
    left, right = (v, dy) if transpose else (dy, v)
    dq, dk, dlam, dg = structure_grads(ops, q, k, log_decay, left, right, chunk_size)
    dh0 = None
    if h0 is not None:
        e_g, _ = _decay_weights(ops, log_decay)
        dq = dq + _scale_rows(dy @ h0.mT, e_g)
        dh0 = _scale_rows(q, e_g).mT @ dy
        if dg is not None:
            dg = dg + e_g * (dy * (q @ h0)).sum(-1)
    dld = None if dg is None else reverse_cumsum(ops, dg)
    return dq, dk, dlam, dld, dv, dh0


def solve_backward(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    y: Array,
    h0: Array | None,
    dy: Array,
    dhn: Array | None,
    *,
    transpose: bool,
    chunk_size: int | None,
):
    """Gradients of ``Y = T^-1 (V - exp(G) ⊙ (Q h0))`` (or ``T^-T V``) and of the
    final state ``h_n = exp(G[-1]) h0 + sum_j exp(G[-1] - G[j]) k_j y_j^T``.

    With ``R = T^-T dY`` (``T^-1 dY`` for the transposed solve): ``dV = R`` and
    ``dT = -R Y^T`` (``-Y R^T``).  Returns ``dq, dk, dlam, dlog_decay, dv, dh0``.
    """
    e_g, e_tail = _decay_weights(ops, log_decay)
    dk_extra = dh0 = dg_extra = None
    if dhn is not None:
        # h_n depends on Y (and k, G, h0) directly: fold that into dY first.
        k_tail = _scale_rows(k, e_tail)
        y_dh = y @ dhn.mT  # (..., n, d): row j is dhn y_j
        dy = dy + k_tail @ dhn
        dk_extra = _scale_rows(y_dh, e_tail)
        if h0 is not None:
            dh0 = dhn if e_g is None else e_g[..., -1, None, None] * dhn
        if log_decay is not None:
            t = (k_tail * y_dh).sum(-1)
            dg_extra = -t
            last = t.sum(-1)
            if h0 is not None:
                last = last + e_g[..., -1] * (h0 * dhn).sum((-2, -1))
            dg_extra[..., -1] = dg_extra[..., -1] + last
    dr, _ = solve(ops, q, k, lam, log_decay, dy, transpose=not transpose, chunk_size=chunk_size)
    left, right = (-y, dr) if transpose else (-dr, y)
    dq, dk, dlam, dg = structure_grads(ops, q, k, log_decay, left, right, chunk_size)
    if h0 is not None:
        dq = dq - _scale_rows(dr @ h0.mT, e_g)
        from_r = -(_scale_rows(q, e_g).mT @ dr)
        dh0 = from_r if dh0 is None else dh0 + from_r
        if dg is not None:
            dg = dg - e_g * (dr * (q @ h0)).sum(-1)
    if dk_extra is not None:
        dk = dk + dk_extra
    if dg_extra is not None:
        dg = dg + dg_extra
    dld = None if dg is None else reverse_cumsum(ops, dg)
    return dq, dk, dlam, dld, dr, dh0


def first_order_only(what: str):
    """Decorator for a hand-written ``backward``: gradients, but no gradient of them.

    Like :func:`torch.autograd.function.once_differentiable`, the backward
    runs without recording a graph.  Under ``create_graph=True`` its results
    are passed through a node whose own backward raises ``NotImplementedError``
    naming ``what``, so that a second derivative fails with a message that
    says it is unsupported (instead of torch's "does not require grad").
    """
    import functools

    import torch

    class SecondOrderUnsupported(torch.autograd.Function):
        @staticmethod
        def forward(ctx, anchor, *grads):
            return tuple(g.clone() for g in grads)

        @staticmethod
        def backward(ctx, *_):
            raise NotImplementedError(
                f"second derivatives of {what} are not supported: its backward pass is "
                "hand-written and not itself differentiable"
            )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            recording = torch.is_grad_enabled()
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not recording:
                return grads
            anchors = [x for x in (*ctx.saved_tensors, *grad_outputs) if _needs_grad(x)]
            present = [i for i, g in enumerate(grads) if g is not None]
            if not anchors or not present:
                return grads
            guarded = SecondOrderUnsupported.apply(anchors[0], *(grads[i] for i in present))
            out = list(grads)
            for i, g in zip(present, guarded, strict=True):
                out[i] = g
            return tuple(out)

        return wrapper

    return decorate


def _needs_grad(x: object) -> bool:
    return x is not None and bool(getattr(x, "requires_grad", False))


def _torch_function_classes():
    import torch

    class TrilSolve(torch.autograd.Function):
        """``(Y, h_n)`` of :func:`dplr.core._kernels.solve` with the hand-written backward."""

        @staticmethod
        def forward(ctx, q, k, lam, log_decay, v, h0, transpose, chunk_size):
            y, hn = solve(
                TorchOps, q, k, lam, log_decay, v,
                transpose=transpose, h0=h0, chunk_size=chunk_size,
            )  # fmt: skip
            ctx.save_for_backward(q, k, lam, log_decay, h0, y)
            ctx.transpose, ctx.chunk_size = transpose, chunk_size
            return y, hn

        @staticmethod
        @first_order_only("dplr.LowRankTril.solve")
        def backward(ctx, dy, dhn):
            q, k, lam, log_decay, h0, y = ctx.saved_tensors
            if dy is None:
                dy = torch.zeros_like(y)
            dhn = None if ctx.transpose else dhn
            grads = solve_backward(
                TorchOps, q, k, lam, log_decay, y, h0, dy, dhn,
                transpose=ctx.transpose, chunk_size=ctx.chunk_size,
            )  # fmt: skip
            return (*grads, None, None)

    class TrilMatmul(torch.autograd.Function):
        """``Y`` of :func:`dplr.core._kernels.matmul` with the hand-written backward."""

        @staticmethod
        def forward(ctx, q, k, lam, log_decay, v, h0, transpose, chunk_size):
            y, _ = matmul(
                TorchOps, q, k, lam, log_decay, v,
                transpose=transpose, h0=h0, chunk_size=chunk_size,
            )  # fmt: skip
            ctx.save_for_backward(q, k, lam, log_decay, v, h0)
            ctx.transpose, ctx.chunk_size = transpose, chunk_size
            return y

        @staticmethod
        @first_order_only("dplr.LowRankTril.matmul")
        def backward(ctx, dy):
            q, k, lam, log_decay, v, h0 = ctx.saved_tensors
            grads = matmul_backward(
                TorchOps, q, k, lam, log_decay, v, h0, dy,
                transpose=ctx.transpose, chunk_size=ctx.chunk_size,
            )  # fmt: skip
            return (*grads, None, None)

    return TrilSolve, TrilMatmul


_CLASSES = None


def torch_functions():
    """``(TrilSolve, TrilMatmul)``, created on first use so torch stays optional."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _torch_function_classes()
    return _CLASSES
