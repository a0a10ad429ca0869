"""The delta rule as one solve and one product with the core structure, and its gradient.

:func:`delta_forward` and :func:`delta_backward` work on one pass in the
kernels' batch-first layout::

    q, k : (..., n, dk)    v : (..., n, dv)    beta, g : (..., n)    s0 : (..., dk, dv)

:func:`delta_forward_passes` and :func:`delta_backward_passes` take the public
layout (B, T, H, .) and run long sequences in passes of whole chunks.

With ``T = I + tril(diag(beta) K K^T ⊙ D, -1)`` (the core structure with
``q := beta k``, unit diagonal, ``log_decay := g``):

    U   = T^-1 (beta ⊙ (V - exp(G) ⊙ (K s0)))        solve, states H_J on the way
    O   = P U + exp(G) ⊙ (Q s0),  P = tril(Q K^T ⊙ D)  (diagonal included)
    S_n = the solve's final state

(derivation: ``docs/delta.md``).  The backward pass is written by hand over the
same chunks (the core's :func:`dplr.core._kernels.make_chunked`): one reverse pass
carries the gradient of the state, everything else is batched over all chunks.
The torch ``autograd.Function`` saves the inputs, U and the states entering
each chunk, O(n (dk + dv) + (n / c) dk dv) numbers, never the graph of a loop.
"""

from __future__ import annotations

import numpy as np

from .._runtime.backend import Array, TorchOps, is_torch
from .._runtime.tuning import DELTA_PASS_ROWS
from ..core import _jit, _kernels
from ..core._kernels import Ops


def delta_forward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    s0: Array | None,
    chunk_size: int | None,
) -> tuple[Array, Array, Array, Array]:
    """O (..., n, dv), the final state (..., dk, dv), U (..., n, dv) and the
    states entering every chunk and after the last, (..., nc + 1, dk, dv).

    ``q`` already carries the output scale; ``g=None`` means no decay.
    """
    kb = beta[..., None] * k
    ones = ops.zeros(beta.shape, beta) + 1.0
    u, states = _kernels.solve(
        ops, kb, k, ones, g, beta[..., None] * v,
        h0=s0, chunk_size=chunk_size, return_states=True,
    )  # fmt: skip
    lam = (q * k).sum(-1)
    o = _kernels.matmul_from_states(ops, q, k, lam, g, u, states, chunk_size=chunk_size)
    return o, states[..., -1, :, :], u, states


def _rowdot(a: Array, b: Array) -> Array:
    return (a * b).sum(-1)


def _decay_masks(ops: Ops, gc: Array | None, c: int, like: Array) -> tuple[Array, Array]:
    """``D`` inside each chunk with and without its diagonal, zero above it.

    gc: (..., nc, c) cumulative log decay within each chunk, or None (D = 1).
    """
    strict = ops.strict_lower_mask(c, like)
    eye = ops.eye(c, like)
    if gc is None:
        low = ops.where(strict, ops.zeros((c, c), like) + 1.0, 0.0)
        return low + eye, low
    low = _kernels.decay_mask(ops, gc, strict)
    return low + eye, low


def _pull_back(dm: Array, mask: Array, m: Array, x: Array, y: Array, decay: bool):
    """Gradients of a masked block ``M = (x y^T) ⊙ mask`` given ``dM`` (dense per chunk).

    Returns ``dx = E y``, ``dy = E^T x`` (``E = dM ⊙ mask``) and, with decay,
    the gradient of the cumulative log decay, ``rowsum(dM ⊙ M) - colsum(dM ⊙ M)``
    (None without).
    """
    e = dm * mask
    if not decay:
        return e @ y, e.mT @ x, None
    f = dm * m
    return e @ y, e.mT @ x, f.sum(-1) - f.sum(-2)


def delta_backward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    u: Array,
    states: Array,
    do: Array,
    dsn: Array | None,
    chunk_size: int | None,
) -> tuple[Array, Array, Array, Array, Array | None, Array]:
    """Gradients ``dq, dk, dv, dbeta, dg, ds0`` of the delta rule, chunk by chunk.

    Per chunk (``docs/delta.md``, the backward pass): with ``L = I + A``,
    ``A = tril(kb k^T ⊙ D, -1)``, ``W = L^-1 (kb ⊙ e^g)``, ``Ũ = L^-1 (beta v)``,
    ``U = Ũ - W H`` and ``O = P U + (q ⊙ e^g) H``, one reverse pass over the
    chunks carries ``dH`` (two small products per chunk, like the forward);
    everything else is batched over all chunks: dU -> dW, then
    ``[dR_w, dR_v] = L^-T [dW, dU]`` and ``dA``, with ``L^-1`` from one block solve.
    O(n c (dk + dv) + n dk dv) flops; the saved states make a forward state
    pass unnecessary.  ``ds0`` is always returned (zeros-initial state).
    """
    n = k.shape[-2]
    c = _kernels.effective_chunk(n, chunk_size)
    kb = beta[..., None] * k
    ones = ops.zeros(beta.shape, beta) + 1.0
    # The solve's blocks: A (strict), R_w = kb e^g (q_in), k_out, chunk decay.
    sol = _kernels.make_chunked(ops, kb, k, ones, g, chunk_size)
    # The output's blocks: P = tril(q k^T ⊙ D) with diagonal q·k, q_in = q e^g.
    out = _kernels.make_chunked(ops, q, k, _rowdot(q, k), g, chunk_size)
    gc = None if g is None else _kernels.chunk_rows(ops, g[..., None], c)[..., 0].cumsum(-1)
    mask_full, mask_strict = _decay_masks(ops, gc, c, q)
    eye = ops.eye(c, q)
    a_strict = _kernels.strict_blocks(ops, sol)
    p_full = _kernels.strict_blocks(ops, out) + out.lam[..., None] * eye
    l_blocks = a_strict + eye
    # A copy, not a view: a view's batch dimensions do not flatten, and every
    # batched product with it would copy it again.
    h = ops.copy(states[..., :-1, :, :])
    uc, doc = _kernels.chunk_rows(ops, u, c), _kernels.chunk_rows(ops, do, c)
    # L^-1 explicitly (one block solve with c columns): it gives W here and
    # L^-T below by products, cheaper than a second, transposed block solve.
    eyes = ops.broadcast_to(eye, l_blocks.shape)
    l_inv = ops.solve_lower_blocks(l_blocks, eyes, kernel=_jit.solve_lower_stack)
    w = l_inv @ sol.q_in
    ut = uc + w @ h

    # Reverse pass over the chunks: dU_J and dH_J (gradient of the state entering J).
    du_local = p_full.mT @ doc
    dh_local = out.q_in.mT @ doc
    dh = ops.zeros(states.shape[:-3] + states.shape[-2:], q) if dsn is None else dsn
    du = ops.zeros(uc.shape, uc)
    dh_next = ops.zeros(h.shape, h)  # gradient of the state leaving each chunk
    for j in range(sol.nc - 1, -1, -1):
        dh_next[..., j, :, :] = dh
        du_j = du_local[..., j, :, :] + sol.k_out[..., j, :, :] @ dh
        du[..., j, :, :] = du_j
        carry = dh if sol.chunk_decay is None else sol.chunk_decay[..., j, None, None] * dh
        dh = carry + dh_local[..., j, :, :] - w[..., j, :, :].mT @ du_j
    ds0 = dh

    # The output product O = P U + (q ⊙ e^g) H.
    decay = gc is not None
    dq, dk, dgam = _pull_back(doc @ uc.mT, mask_full, p_full, out.q, out.k, decay)
    do_h = doc @ h.mT  # (..., nc, c, d)
    if gc is None:
        dq = dq + do_h
    else:
        e_g = ops.exp(gc)[..., None]
        dq = dq + e_g * do_h
        dgam = dgam + _rowdot(out.q_in, do_h)
    # The state update H' = a H + k_out^T U (its dU share is in the pass above).
    u_dh = uc @ dh_next.mT  # (..., nc, c, d)
    if gc is None:
        dk = dk + u_dh
    else:
        dk = dk + ops.exp(gc[..., -1:] - gc)[..., None] * u_dh
        t = _rowdot(sol.k_out, u_dh)
        last = t.sum(-1) + sol.chunk_decay * (h * dh_next).sum((-2, -1))
        dgam = dgam - t
        dgam[..., -1] = dgam[..., -1] + last
    # U = Ũ - W H with [W, Ũ] = L^-1 [R_w, R_v]: one transposed block solve.
    dw = -(du @ h.mT)
    dr_w, dr_v = l_inv.mT @ dw, l_inv.mT @ du
    dkb, dk_a, dgam_a = _pull_back(
        -(dr_w @ w.mT + dr_v @ ut.mT), mask_strict, a_strict, sol.q, sol.k, decay
    )
    dk = dk + dk_a
    if gc is None:
        dkb = dkb + dr_w
    else:
        dkb = dkb + e_g * dr_w
        dgam = dgam + dgam_a + _rowdot(dr_w, sol.q_in)
    # Back from chunks to rows, and from kb = beta k, R_v = beta v.
    dq, dk, dkb, dr_v = (_kernels.unchunk_rows(x, n) for x in (dq, dk, dkb, dr_v))
    dk = dk + beta[..., None] * dkb
    dbeta = _rowdot(dkb, k) + _rowdot(dr_v, v)
    dv = beta[..., None] * dr_v
    dg = None
    if gc is not None:
        dgam = ops.flip(ops.flip(dgam, -1).cumsum(-1), -1)  # G = cumsum(g) within chunks
        dg = _kernels.unchunk_rows(dgam[..., None], n)[..., 0]
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
    and, with ``for_backward``, U (B, H, T, dv) and the chunk states
    (B, H, nc + 1, dk, dv) (else None, None).
    """
    B, n, H = q.shape[:3]
    out = ops.zeros((B, n, H, v.shape[-1]), v)
    us, states = [], []
    s = s0
    for a, b in _passes(n, pass_length(q.shape, chunk_size)):
        o, s, u, st = delta_forward(
            ops, *(heads_first(None if x is None else x[:, a:b]) for x in (q, k, v, beta, g)),
            s, chunk_size,
        )  # fmt: skip
        out[:, a:b] = _tokens_first(o)
        if for_backward:
            us.append(u)
            states.append(st[..., :-1, :, :])
    if not for_backward:
        return out, s, None, None
    states.append(st[..., -1:, :, :])
    return out, s, _cat(ops, us, -2), _cat(ops, states, -3)


def _cat(ops: Ops, xs: list[Array], axis: int) -> Array:
    return xs[0] if len(xs) == 1 else ops.concat(xs, axis)


def delta_backward_passes(ops, q, k, v, beta, g, u, states, do, dsn, chunk_size):
    """:func:`delta_backward` over the passes of :func:`delta_forward_passes`, last first.

    Inputs and ``do`` in the public layout, u and states as the forward pass
    returned them; the gradients come back in the public layout.
    """
    n = q.shape[1]
    c = _kernels.effective_chunk(n, chunk_size)
    grads = [ops.zeros(x.shape, x) for x in (q, k, v, beta)]
    grads.append(None if g is None else ops.zeros(g.shape, g))
    for a, b in reversed(_passes(n, pass_length(q.shape, chunk_size))):
        rows = (heads_first(None if x is None else x[:, a:b]) for x in (q, k, v, beta, g))
        # Chunk size as in the forward pass, whose passes are whole chunks.
        *part, dsn = delta_backward(
            ops, *rows, u[..., a:b, :], states[..., a // c : -(-b // c) + 1, :, :],
            heads_first(do[:, a:b]), dsn, c,
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
            o, sn, u, states = delta_forward_passes(TorchOps, q, k, v, beta, g, s0, chunk_size)
            ctx.save_for_backward(q, k, v, beta, g, u, states)
            ctx.has_s0 = s0 is not None
            ctx.chunk_size = chunk_size
            return o, sn

        @staticmethod
        @first_order_only("dplr.delta_rule")
        def backward(ctx, do, dsn):
            q, k, v, beta, g, u, states = ctx.saved_tensors
            if do is None:
                do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
            dq, dk, dv, dbeta, dg, ds0 = delta_backward_passes(
                TorchOps, q, k, v, beta, g, u, states, do, dsn, ctx.chunk_size
            )
            return dq, dk, dv, dbeta, dg, ds0 if ctx.has_s0 else None, None

    return DeltaRuleFunction


_CLASS = None


def delta_function():
    """The ``torch.autograd.Function`` of the delta rule, created on first use."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _torch_function_class()
    return _CLASS
