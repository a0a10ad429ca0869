"""Hand-written gradients of the chunked product and solve (docs/algorithms.md, 1.4).

Every gradient is again a product or a solve with a matrix of the same
structure, so the backward pass costs what the forward pass costs and never
forms an n x n matrix.  The pure functions work for NumPy and torch alike; the
``torch.autograd.Function`` classes at the bottom wrap them so that torch
saves only the operands and the result, never the graph of the chunk loop.
"""

from __future__ import annotations

import math

from .._runtime.backend import Array, TorchOps
from ._decay import channel_pull_blocks, global_weights
from ._kernels import (
    Ops,
    _state_sequence,
    chunk_rows,
    is_per_channel,
    make_chunked,
    matmul,
    reversed_operands,
    solve,
    unchunk_rows,
)


def reverse_cumsum(ops: Ops, x: Array, axis: int = -1) -> Array:
    """``out[s] = sum_{m >= s} x[m]`` along ``axis`` (the adjoint of cumsum)."""
    return ops.flip(ops.flip(x, axis).cumsum(axis), axis)


def log_decay_grad(ops: Ops, q: Array, log_decay: Array, dg: Array) -> Array:
    """``dlog_decay`` from ``dG`` (G = cumsum(log_decay) along n); 0 at ``-inf`` entries."""
    dld = reverse_cumsum(ops, dg, -2 if is_per_channel(q, log_decay) else -1)
    return ops.where(log_decay == -math.inf, 0.0 * dld, dld)


def channel_pullback(
    ops: Ops, k: Array, log_decay: Array, left: Array, right: Array, chunk_size: int | None
) -> Array:
    """``dq_ic = sum_{j<i} (left_i . right_j) k_jc exp(G_ic - G_jc)`` for per-channel decay.

    The q-gradient of ``sum_ij dT_ij T_ij`` for ``dT = left right^T``: inside
    each chunk by :func:`dplr.core._decay.channel_pull_blocks`; from earlier
    chunks through the state ``Z = sum_j Diag(exp(G_s - G_j)) k_j right_j^T``
    of the product (the same recurrence as the forward state),
    ``dq_i += exp(G_i - G_s) ⊙ (Z left_i)``.  O(n c (d + m) + n d m).
    """
    ones = 0.0 * k + 1.0
    # With q = 1, q_in holds the weights exp(G_i - G_s) themselves.
    ch = make_chunked(ops, ones, k, ones[..., 0], log_decay, chunk_size)
    lc, rc = chunk_rows(ops, left, ch.c), chunk_rows(ops, right, ch.c)
    dq = channel_pull_blocks(ops, ops.matmul(lc, rc.mT), ch.k, ch.decay)
    states = _state_sequence(ops, ch, ops.matmul(ch.k_out.mT, rc), None)
    dq = dq + ch.q_in * ops.matmul(lc, states[..., :-1, :, :].mT)
    return unchunk_rows(dq, ch.n)


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
    dlam = (left * right).sum(-1)
    if is_per_channel(q, log_decay):
        # Per channel: dG_ic = q_ic dq_ic - k_ic dk_ic, and dk by reversal.
        dq = channel_pullback(ops, k, log_decay, left, right, chunk_size)
        _, rk, _, rdecay = reversed_operands(ops, q, k, dlam, log_decay)
        rleft, rright = ops.flip(right, -2), ops.flip(left, -2)
        dk = ops.flip(channel_pullback(ops, rk, rdecay, rleft, rright, chunk_size), -2)
        return dq, dk, dlam, q * dq - k * dk
    zero = ops.zeros(left.shape[:-1], left)
    dq, _ = matmul(ops, left, right, zero, log_decay, k, chunk_size=chunk_size)
    dk, _ = matmul(ops, left, right, zero, log_decay, q, transpose=True, chunk_size=chunk_size)
    dg = None if log_decay is None else (q * dq).sum(-1) - (k * dk).sum(-1)
    return dq, dk, dlam, dg


def _decay_weights(ops: Ops, q: Array, log_decay: Array | None):
    """``exp(G)`` and ``exp(G[-1] - G)`` (both <= 1, resets exact), or None without decay.

    (..., n), or (..., n, d) per channel.
    """
    if log_decay is None:
        return None, None
    return global_weights(ops, log_decay, -2 if is_per_channel(q, log_decay) else -1)


def _scale_rows(x: Array, factors: Array | None) -> Array:
    """Rows of x (..., n, d) times decay factors: (..., n) per row or (..., n, d) per channel."""
    if factors is None:
        return x
    return x * factors if factors.ndim == x.ndim else x * factors[..., None]


def _per_decay(x: Array, factors: Array) -> Array:
    """A per-channel term x (..., n, d) summed over channels when the decay is per row."""
    return x if factors.ndim == x.ndim else x.sum(-1)


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
        e_g, _ = _decay_weights(ops, q, log_decay)
        dy_h = dy @ h0.mT
        dq = dq + _scale_rows(dy_h, e_g)
        dh0 = _scale_rows(q, e_g).mT @ dy
        if dg is not None:
            dg = dg + e_g * _per_decay(q * dy_h, e_g)
    dld = None if dg is None else log_decay_grad(ops, q, log_decay, dg)
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
    e_g, e_tail = _decay_weights(ops, q, log_decay)
    channel = is_per_channel(q, log_decay)
    dk_extra = dh0 = dg_extra = None
    if dhn is not None:
        # h_n depends on Y (and k, G, h0) directly: fold that into dY first.
        k_tail = _scale_rows(k, e_tail)
        y_dh = y @ dhn.mT  # (..., n, d): row j is dhn y_j
        dy = dy + k_tail @ dhn
        dk_extra = _scale_rows(y_dh, e_tail)
        # The decay of h0 across the whole sequence: (..., d) per channel, else (...).
        e_last = None if e_g is None else e_g[..., -1, :] if channel else e_g[..., -1]
        if h0 is not None:
            dh0 = (
                dhn
                if e_g is None
                else dhn * (e_last[..., None] if channel else e_last[..., None, None])
            )
        if log_decay is not None:
            t = _per_decay(k_tail * y_dh, e_g)
            dg_extra = -t
            last = t.sum(-2 if channel else -1)
            if h0 is not None:
                h0_dhn = (h0 * dhn).sum(-1)  # (..., d)
                last = last + e_last * (h0_dhn if channel else h0_dhn.sum(-1))
            row = (..., -1, slice(None)) if channel else (..., -1)
            dg_extra[row] = dg_extra[row] + last
    dr, _ = solve(ops, q, k, lam, log_decay, dy, transpose=not transpose, chunk_size=chunk_size)
    left, right = (-y, dr) if transpose else (-dr, y)
    dq, dk, dlam, dg = structure_grads(ops, q, k, log_decay, left, right, chunk_size)
    if h0 is not None:
        dq = dq - _scale_rows(dr @ h0.mT, e_g)
        from_r = -(_scale_rows(q, e_g).mT @ dr)
        dh0 = from_r if dh0 is None else dh0 + from_r
        if dg is not None:
            dg = dg - e_g * _per_decay(q * (dr @ h0.mT), e_g)
    if dk_extra is not None:
        dk = dk + dk_extra
    if dg_extra is not None:
        dg = dg + dg_extra
    dld = None if dg is None else log_decay_grad(ops, q, log_decay, dg)
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
