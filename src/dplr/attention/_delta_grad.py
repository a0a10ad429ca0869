"""The delta rule as one solve and one product with the core structure, and its gradient.

:func:`delta_forward` and :func:`delta_backward` work on one pass in the
kernels' batch-first layout::

    q, k : (..., n, dk)    v : (..., n, dv)    beta, g : (..., n)    s0 : (..., dk, dv)

:func:`delta_forward_passes` and :func:`delta_backward_passes` take the public
layout (B, T, H, .) and run long sequences in passes of whole chunks.

With ``T = I + tril(diag(beta) K K^T ⊙ D, -1)`` (the core structure with
``q := beta k``, unit diagonal, ``log_decay := g``):

    V_new = T^-1 (beta ⊙ (V - exp(G) ⊙ (K s0)))      solve, states H_J on the way
    O     = P V_new + exp(G) ⊙ (Q s0),  P = tril(Q K^T ⊙ D)  (diagonal included)
    S_n = the solve's final state

(derivation: ``docs/delta.md``).  The backward pass is written by hand over the
same chunks (the core's :func:`dplr.core._kernels.make_chunked`): one reverse pass
carries the gradient of the state, everything else is batched over all chunks.
The torch ``autograd.Function`` saves the inputs, the new values V_new, the states entering
each chunk and the c x c blocks of both structures that the forward pass
formed, O(n (dk + dv + 2 c) + (n / c) dk dv) numbers, never the graph of a
loop (``docs/delta.md``, section 4.1).
"""

from __future__ import annotations

import math

import numpy as np

from .._runtime.backend import Array, TorchOps, is_torch
from .._runtime.tuning import DELTA_PASS_ROWS
from ..core import _jit, _kernels
from ..core._decay import channel_pull_blocks_pair
from ..core._grad import reverse_cumsum
from ..core._kernels import Ops, is_per_channel
from . import _chunked_grad


def delta_forward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    s0: Array | None,
    chunk_size: int | None,
    keep_blocks: bool = False,
) -> tuple[Array, Array, Array, Array, tuple[Array, Array] | None]:
    """O (..., n, dv), the final state (..., dk, dv), the new values V_new (..., n, dv), the
    states entering every chunk and after the last, (..., nc + 1, dk, dv),
    and, with ``keep_blocks``, the blocks ``L = I + A`` of the solve and
    ``tril(P, -1)`` of the output, (..., nc, c, c) each (else None).

    ``q`` already carries the output scale; ``g=None`` means no decay.  The
    two structures share their decay weights (formed once).
    """
    ones = ops.zeros(beta.shape, beta) + 1.0
    sol = _kernels.make_chunked(ops, beta[..., None] * k, k, ones, g, chunk_size)
    out = _kernels.make_chunked(ops, q, k, _rowdot(q, k), g, chunk_size, decay_of=sol)
    l_blocks = _kernels.diagonal_blocks(ops, sol, scratch=not keep_blocks)
    v_new, states = _kernels.solve_chunked(ops, sol, l_blocks, beta[..., None] * v, s0, True)
    p_strict = _kernels.strict_blocks(ops, out)
    o = _kernels.matmul_chunked(ops, out, p_strict, v_new, states)
    blocks = (l_blocks, p_strict) if keep_blocks else None
    return o, states[..., -1, :, :], v_new, states, blocks


def _rowdot(a: Array, b: Array) -> Array:
    return (a * b).sum(-1)


def _per_weight(x: Array, factors: Array) -> Array:
    """A per-channel term x (..., c, dk) reduced to the shape of the weights (..., c, e)."""
    return x if factors.shape[-1] == x.shape[-1] else x.sum(-1, keepdims=True)


def _pull_back_strict(ops: Ops, dm: Array, ch, blocks: Array):
    """Gradients of the strict blocks ``M = tril(T_JJ, -1)`` of ``ch`` given ``dM``.

    ``M_ij = sum_c x_ic y_jc exp(G_ic - G_jc)`` (i > j; x, y = ch.q, ch.k)
    gives ``dx_i = sum_j dM_ij (y_j ⊙ exp(G_i - G_j))``, ``dy`` alike, and
    ``dG = x ⊙ dx - y ⊙ dy`` per channel; with one decay per row that is
    ``rowsum(dM ⊙ M) - colsum(dM ⊙ M)``.  Per channel, dx and dy are the
    core's :func:`dplr.core._decay.channel_pull_blocks_pair` (the anchored
    weights of the blocks, formed once).  ``blocks`` is M.  Returns ``dx, dy, dG``
    (dG (..., nc, c, e), None without decay).
    """
    x, y = ch.q, ch.k
    if ch.decay is None:
        if ch.mask is None:
            e = ops.where(ops.strict_lower_mask(ch.c, dm), dm, 0.0)
            return e @ y, e.mT @ x, None
        e = dm * ch.mask  # the mask is zero on and above the diagonal
        f = dm * blocks
        return e @ y, e.mT @ x, (f.sum(-1) - f.sum(-2))[..., None]
    dx, dy = channel_pull_blocks_pair(ops, dm, x, y, ch.decay)
    return dx, dy, x * dx - y * dy


def delta_backward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    v_new: Array,
    states: Array,
    do: Array,
    dsn: Array | None,
    chunk_size: int | None,
    blocks: tuple[Array, Array] | None = None,
) -> tuple[Array, Array, Array, Array, Array | None, Array]:
    """Gradients ``dq, dk, dv, dbeta, dg, ds0`` of the delta rule, chunk by chunk.

    Per chunk (``docs/delta.md``, the backward pass): with ``L = I + A``,
    ``A = tril(T_JJ, -1)`` of the solve, ``W = L^-1 (kb ⊙ e^G)``,
    ``Ṽ = L^-1 (beta v)``, ``V_new = Ṽ - W H`` and ``O = P V_new + (q ⊙ e^G) H``, one
    reverse pass over the chunks carries ``dH``
    (:func:`dplr.core._kernels.state_pass_adjoint`); everything else is
    batched over all chunks: dV_new -> dW, then ``[dR_w, dR_v] = L^-T [dW, dV_new]``
    (:func:`dplr.core._kernels.solve_blocks_transposed`) and ``dA``.  The
    blocks, decay factors and chunks are the core's, for one decay per row
    (``g`` (..., n)) or per channel (``g`` (..., n, dk)).
    O(n c (dk + dv) + n dk dv) flops; the saved states make a forward state
    pass unnecessary, and ``blocks``, the forward's ``I + A`` and
    ``tril(P, -1)`` (:func:`delta_forward` with ``keep_blocks``), forming the
    blocks again (formed here when None).  ``ds0`` is always returned.
    """
    n, d = k.shape[-2], k.shape[-1]
    kb = beta[..., None] * k
    ones = ops.zeros(beta.shape, beta) + 1.0
    # The solve's blocks A and the output's P = tril(q k^T ⊙ D) with diagonal q·k.
    sol = _kernels.make_chunked(ops, kb, k, ones, g, chunk_size)
    out = _kernels.make_chunked(ops, q, k, _rowdot(q, k), g, chunk_size, decay_of=sol)
    c = sol.c
    if blocks is None:
        blocks = _kernels.diagonal_blocks(ops, sol), _kernels.strict_blocks(ops, out)
    # L = I + A has zeros above the diagonal; its unit diagonal cancels in dG.
    l_blocks, p_strict = blocks
    # A copy, not a view: a view's batch dimensions do not flatten, and every
    # batched product with it would copy it again.
    h = ops.copy(states[..., :-1, :, :])
    v_new_c, doc = _kernels.chunk_rows(ops, v_new, c), _kernels.chunk_rows(ops, do, c)
    wy = ops.solve_lower_blocks(l_blocks, sol.q_in, kernel=_jit.solve_lower_stack)
    v_tilde = v_new_c + wy @ h

    # Reverse pass over the chunks: dU_J and the gradient of the state leaving J.
    dv_new_local = p_strict.mT @ doc + out.lam[..., None] * doc
    dv_new, dh_next, ds0 = _kernels.state_pass_adjoint(
        ops, sol, wy, dv_new_local, out.q_in, doc, dsn
    )

    # The output product O = P V_new + (q ⊙ e^G) H.
    dp = doc @ v_new_c.mT
    dq, dk, dgam = _pull_back_strict(ops, dp, out, p_strict)
    diag = dp.diagonal(0, -2, -1)[..., None]  # the diagonal q·k: no decay
    dq, dk = dq + diag * out.k, dk + diag * out.q
    do_h = doc @ h.mT  # (..., nc, c, dk)
    # The state update H' = Diag(a) H + k_out^T V_new (its dV_new share is in the pass).
    v_new_dh = v_new_c @ dh_next.mT  # (..., nc, c, dk)
    if g is None:
        dq, dk = dq + do_h, dk + v_new_dh
    else:
        w_in, w_out = sol.w_in, sol.w_out
        dq, dk = dq + w_in * do_h, dk + w_out * v_new_dh
        t = _per_weight(sol.k_out * v_new_dh, w_in)
        h_dh = (h * dh_next).sum(-1)  # (..., nc, dk)
        if sol.decay is None:  # the chunk's decay a_J, one per row: (..., nc)
            h_dh = sol.chunk_decay[..., None] * h_dh.sum(-1, keepdims=True)
        else:
            h_dh = sol.chunk_decay * h_dh
        dgam = dgam + _per_weight(out.q_in * do_h, w_in) - t
        dgam[..., -1, :] = dgam[..., -1, :] + t.sum(-2) + h_dh
    # V_new = Ṽ - W H with [W, Ṽ] = L^-1 [kb ⊙ e^G, beta v]: one transposed block solve.
    dr = _kernels.solve_blocks_transposed(ops, l_blocks, ops.concat([-(dv_new @ h.mT), dv_new], -1))
    dr_w, dr_v = dr[..., :d], dr[..., d:]
    da = -(dr_w @ wy.mT + dr_v @ v_tilde.mT)
    dkb, dk_a, dgam_a = _pull_back_strict(ops, da, sol, l_blocks)
    dk = dk + dk_a
    if g is None:
        dkb = dkb + dr_w
    else:
        dkb = dkb + w_in * dr_w
        dgam = dgam + dgam_a + _per_weight(sol.q_in * dr_w, w_in)
    # Back from chunks to rows, and from kb = beta k, R_v = beta v.
    dq, dk, dkb, dr_v = (_kernels.unchunk_rows(x, n) for x in (dq, dk, dkb, dr_v))
    dk = dk + beta[..., None] * dkb
    dbeta = _rowdot(dkb, k) + _rowdot(dr_v, v)
    dv = beta[..., None] * dr_v
    dg = None
    if g is not None:
        # G = cumsum(g) within each chunk; a -inf entry gets no gradient.
        dg = _kernels.unchunk_rows(reverse_cumsum(ops, dgam, -2), n)
        dg = dg if is_per_channel(k, g) else dg[..., 0]
        dg = ops.where(g == -math.inf, 0.0 * dg, dg)
    return dq, dk, dv, dbeta, dg, ds0


#: Rows (batch x heads x tokens) per pass over the sequence (the measurement:
#: :data:`dplr._runtime.tuning.DELTA_PASS_ROWS`).
PASS_ROWS = DELTA_PASS_ROWS


def pass_length(shape: tuple[int, ...], chunk_size: int | None) -> int:
    """Tokens per pass for operands of public ``shape`` (B, T, H, d): whole chunks."""
    B, n, H = shape[:3]
    c = _kernels.effective_chunk(n, chunk_size)
    return max(c, PASS_ROWS // max(B * H, 1) // c * c)


def heads_first(x: Array | None) -> Array | None:
    """(B, T, H, ...) -> (B, H, T, ...), contiguous (batched products of a
    strided operand would copy it again and again)."""
    if x is None:
        return None
    if is_torch(x):
        return x.transpose(1, 2).contiguous()
    return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def _tokens_first(x: Array) -> Array:
    """(B, H, T, ...) -> (B, T, H, ...), a view."""
    return x.transpose(1, 2) if is_torch(x) else np.swapaxes(x, 1, 2)


def _passes(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def delta_forward_passes(ops, q, k, v, beta, g, s0, chunk_size, *, for_backward=True):
    """:func:`delta_forward` in the public layout, in passes of :func:`pass_length` tokens.

    q, k (B, T, H, dk), v (B, T, H, dv), beta, g (B, T, H), s0 (B, H, dk, dv).
    Each pass is moved to the kernels' batch-first layout on its own, and its
    output written straight into O (B, T, H, dv).  Returns O, the final state
    and, with ``for_backward``, what :func:`delta_backward_passes` reads
    (else None): V_new (B, H, T, dv), the chunk states (B, H, nc + 1, dk, dv),
    then the blocks ``I + A`` of every pass and the blocks ``tril(P, -1)`` of
    every pass (B, H, nc_pass, c, c).
    """
    B, n, H = q.shape[:3]
    out = ops.zeros((B, n, H, v.shape[-1]), v)
    v_news, states, l_blocks, p_blocks = [], [], [], []
    s = s0
    for a, b in _passes(n, pass_length(q.shape, chunk_size)):
        o, s, v_new, st, blocks = delta_forward(
            ops, *(heads_first(None if x is None else x[:, a:b]) for x in (q, k, v, beta, g)),
            s, chunk_size, for_backward,
        )  # fmt: skip
        out[:, a:b] = _tokens_first(o)
        if for_backward:
            v_news.append(v_new)
            states.append(st[..., :-1, :, :])
            l_blocks.append(blocks[0])
            p_blocks.append(blocks[1])
    if not for_backward:
        return out, s, None
    states.append(st[..., -1:, :, :])
    # The blocks stay per pass: a last pass shorter than a chunk has smaller ones.
    return out, s, (_cat(ops, v_news, -2), _cat(ops, states, -3), *l_blocks, *p_blocks)


def _cat(ops: Ops, xs: list[Array], axis: int) -> Array:
    return xs[0] if len(xs) == 1 else ops.concat(xs, axis)


def delta_backward_passes(ops, q, k, v, beta, g, saved, do, dsn, chunk_size):
    """:func:`delta_backward` over the passes of :func:`delta_forward_passes`, last first.

    Inputs and ``do`` in the public layout, ``saved`` as the forward pass
    returned it; the gradients come back in the public layout.
    """
    v_new, states, *blocks = saved
    n = q.shape[1]
    c = _kernels.effective_chunk(n, chunk_size)
    grads = [ops.zeros(x.shape, x) for x in (q, k, v, beta)]
    grads.append(None if g is None else ops.zeros(g.shape, g))
    passes = _passes(n, pass_length(q.shape, chunk_size))
    for i in reversed(range(len(passes))):
        a, b = passes[i]
        rows = (heads_first(None if x is None else x[:, a:b]) for x in (q, k, v, beta, g))
        # Chunk size as in the forward pass, whose passes are whole chunks.
        *part, dsn = delta_backward(
            ops, *rows, v_new[..., a:b, :], states[..., a // c : -(-b // c) + 1, :, :],
            heads_first(do[:, a:b]), dsn, c, (blocks[i], blocks[len(passes) + i]),
        )  # fmt: skip
        for full, piece in zip(grads, part, strict=True):
            if full is not None:
                full[:, a:b] = _tokens_first(piece)
    return (*grads, dsn)


def _torch_function_class():
    import torch

    from ..core._grad import first_order_only

    class DeltaRuleFunction(torch.autograd.Function):
        """``(O, S_n)`` of :func:`delta_forward` with the hand-written backward."""

        @staticmethod
        def forward(ctx, q, k, v, beta, g, s0, chunk_size):
            ctx.has_s0 = s0 is not None
            ctx.chunk_size = chunk_size
            ctx.compiled = _chunked_grad.applies(q, g, (q, k, v, beta, g, s0))
            if ctx.compiled:  # one compiled loop per head, forward and backward
                ctx.chunk_size = _kernels.effective_chunk(q.shape[1], chunk_size)
                o, sn, *saved = _chunked_grad.forward_saving(q, k, v, beta, g, s0, ctx.chunk_size)
            else:
                o, sn, saved = delta_forward_passes(TorchOps, q, k, v, beta, g, s0, chunk_size)
            ctx.save_for_backward(q, k, v, beta, g, *saved)
            return o, sn

        @staticmethod
        @first_order_only("dplr.delta_rule")
        def backward(ctx, do, dsn):
            q, k, v, beta, g, *saved = ctx.saved_tensors
            if do is None:
                do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
            run = _chunked_grad.backward if ctx.compiled else _backward_in_steps
            dq, dk, dv, dbeta, dg, ds0 = run(q, k, v, beta, g, *saved, do, dsn, ctx.chunk_size)
            return dq, dk, dv, dbeta, dg, ds0 if ctx.has_s0 else None, None

    return DeltaRuleFunction


def _backward_in_steps(q, k, v, beta, g, *rest):
    """:func:`delta_backward_passes` with torch, arguments as :func:`_chunked_grad.backward`."""
    *saved, do, dsn, chunk_size = rest
    return delta_backward_passes(TorchOps, q, k, v, beta, g, saved, do, dsn, chunk_size)


_CLASS = None


def delta_function():
    """The ``torch.autograd.Function`` of the delta rule, created on first use."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _torch_function_class()
    return _CLASS
