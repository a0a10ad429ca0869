"""The delta rule as one solve and one product with the core structure, and its gradient.

Batch-first layout throughout (the public wrapper in :mod:`dplr.delta` does the
transposes)::

    q, k : (..., n, dk)    v : (..., n, dv)    beta, g : (..., n)    s0 : (..., dk, dv)

With ``T = I + tril(diag(beta) K K^T ⊙ D, -1)`` (the core structure with
``q := beta k``, unit diagonal, ``log_decay := g``):

    U   = T^-1 (beta ⊙ (V - exp(G) ⊙ (K s0)))        solve, states H_J on the way
    O   = P U + exp(G) ⊙ (Q s0),  P = tril(Q K^T ⊙ D)  (diagonal included)
    S_n = the solve's final state

(derivation: ``docs/delta.md``).  The backward pass is written by hand over the
same chunks (the core's :func:`dplr._kernels.make_chunked`): one reverse pass
carries the gradient of the state, everything else is batched over all chunks.
The torch ``autograd.Function`` saves the inputs, U and the states entering
each chunk, O(n (dk + dv) + (n / c) dk dv) numbers, never the graph of a loop.
"""

from __future__ import annotations

from . import _kernels
from ._backend import Array, TorchOps
from ._kernels import Ops


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
    rel = gc[..., :, None] - gc[..., None, :]
    low = ops.exp(ops.where(strict, rel, -float("inf")))
    return low + eye, low


def _pull_back(dm: Array, mask: Array, m: Array, x: Array, y: Array):
    """Gradients of a masked block ``M = (x y^T) ⊙ mask`` given ``dM`` (dense per chunk).

    Returns ``dx = E y``, ``dy = E^T x`` (``E = dM ⊙ mask``) and the gradient
    of the cumulative log decay, ``rowsum(dM ⊙ M) - colsum(dM ⊙ M)``.
    """
    e = dm * mask
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
    everything else is batched over all chunks: dU -> dW, then one transposed
    block solve gives ``[dR_w, dR_v] = L^-T [dW, dU]`` and ``dA``.
    O(n c (dk + dv) + n dk dv) flops; the saved states make a forward state
    pass unnecessary.  ``ds0`` is always returned (zeros-initial state).
    """
    n, d = k.shape[-2:]
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
    p_full = out.strict_blocks + out.lam[..., None] * eye
    l_blocks = sol.strict_blocks + eye
    h = states[..., :-1, :, :]
    uc, doc = _kernels.chunk_rows(ops, u, c), _kernels.chunk_rows(ops, do, c)
    w = ops.solve_lower_blocks(l_blocks, sol.q_in)
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
    dq, dk, dgam = _pull_back(doc @ uc.mT, mask_full, p_full, out.q, out.k)
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
    dr = _solve_upper_blocks(ops, l_blocks, ops.concat([dw, du], -1))
    dr_w, dr_v = dr[..., :d], dr[..., d:]
    dkb, dk_a, dgam_a = _pull_back(
        -(dr @ ops.concat([w, ut], -1).mT), mask_strict, sol.strict_blocks, sol.q, sol.k
    )
    dk = dk + dk_a
    dgam = dgam + dgam_a
    if gc is None:
        dkb = dkb + dr_w
    else:
        dkb = dkb + e_g * dr_w
        dgam = dgam + _rowdot(dr_w, sol.q_in)
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


def _solve_upper_blocks(ops: Ops, l_blocks: Array, x: Array) -> Array:
    """``L^-T X`` for lower-triangular blocks L, as a lower solve in reversed order."""
    rev = ops.flip(ops.flip(l_blocks.mT, -1), -2)
    return ops.flip(ops.solve_lower_blocks(rev, ops.flip(x, -2)), -2)


def _torch_function_class():
    import torch
    from torch.autograd.function import once_differentiable

    class DeltaRuleFunction(torch.autograd.Function):
        """``(O, S_n)`` of :func:`delta_forward` with the hand-written backward."""

        @staticmethod
        def forward(ctx, q, k, v, beta, g, s0, chunk_size):
            o, sn, u, states = delta_forward(TorchOps, q, k, v, beta, g, s0, chunk_size)
            ctx.save_for_backward(q, k, v, beta, g, u, states)
            ctx.has_s0 = s0 is not None
            ctx.chunk_size = chunk_size
            return o, sn

        @staticmethod
        @once_differentiable
        def backward(ctx, do, dsn):
            q, k, v, beta, g, u, states = ctx.saved_tensors
            if do is None:
                do = torch.zeros_like(u)
            dq, dk, dv, dbeta, dg, ds0 = delta_backward(
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
