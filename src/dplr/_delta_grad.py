"""The delta rule as one solve and one product with the core structure, and its gradient.

Batch-first layout throughout (the public wrapper in :mod:`dplr.delta` does the
transposes)::

    q, k : (..., n, dk)    v : (..., n, dv)    beta, g : (..., n)    s0 : (..., dk, dv)

With ``T = I + tril(diag(beta) K K^T ⊙ D, -1)`` (the core structure with
``q := beta k``, unit diagonal, ``log_decay := g``):

    U   = T^-1 (beta ⊙ (V - exp(G) ⊙ (K s0)))        solve, states H_J on the way
    O   = P U + exp(G) ⊙ (Q s0),  P = tril(Q K^T ⊙ D)  (diagonal included)
    S_n = the solve's final state

(derivation: ``docs/delta.md``).  The backward pass is the composition of the
core's hand-written backward functions for the product and the solve; the
torch ``autograd.Function`` saves only the inputs and U, never the graph of a
chunk loop.
"""

from __future__ import annotations

from . import _kernels
from ._backend import Array, TorchOps
from ._kernels import Ops
from ._tril_grad import matmul_backward, solve_backward


def delta_forward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    s0: Array | None,
    chunk_size: int | None,
) -> tuple[Array, Array, Array]:
    """Outputs O (..., n, dv), final state (..., dk, dv) and U = T^-1 (...) (..., n, dv).

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
    return o, states[..., -1, :, :], u


def delta_backward(
    ops: Ops,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    s0: Array | None,
    u: Array,
    do: Array,
    dsn: Array | None,
    chunk_size: int | None,
) -> tuple[Array, Array, Array, Array, Array | None, Array | None]:
    """Gradients ``dq, dk, dv, dbeta, dg, ds0`` from those of O and the final state.

    The product ``O = T_o U + exp(G) ⊙ (Q s0)`` with ``T_o = diag(q·k) +
    tril(Q K^T ⊙ D, -1)`` gives dU (and its share of dq, dk, dg, ds0); the
    solve then gives the rest, with ``q := beta k`` and ``v := beta v``
    chained back to k, v and beta.  O(n c (dk + dv) + n dk dv) like the forward.
    """
    lam = (q * k).sum(-1)
    dq, dk, dlam, dg, du, ds0 = matmul_backward(
        ops, q, k, lam, g, u, s0, do, transpose=False, chunk_size=chunk_size
    )
    dq = dq + dlam[..., None] * k
    dk = dk + dlam[..., None] * q
    kb = beta[..., None] * k
    ones = ops.zeros(beta.shape, beta) + 1.0
    dkb, dk2, _, dg2, dvb, ds0_2 = solve_backward(
        ops, kb, k, ones, g, u, s0, du, dsn, transpose=False, chunk_size=chunk_size
    )
    dk = dk + dk2 + beta[..., None] * dkb
    dbeta = (dkb * k).sum(-1) + (dvb * v).sum(-1)
    dv = beta[..., None] * dvb
    if dg is not None:
        dg = dg + dg2
    if ds0 is not None:
        ds0 = ds0 + ds0_2
    return dq, dk, dv, dbeta, dg, ds0


def _torch_function_class():
    import torch
    from torch.autograd.function import once_differentiable

    class DeltaRuleFunction(torch.autograd.Function):
        """``(O, S_n)`` of :func:`delta_forward` with the hand-written backward."""

        @staticmethod
        def forward(ctx, q, k, v, beta, g, s0, chunk_size):
            o, sn, u = delta_forward(TorchOps, q, k, v, beta, g, s0, chunk_size)
            ctx.save_for_backward(q, k, v, beta, g, s0, u)
            ctx.chunk_size = chunk_size
            return o, sn

        @staticmethod
        @once_differentiable
        def backward(ctx, do, dsn):
            q, k, v, beta, g, s0, u = ctx.saved_tensors
            if do is None:
                do = torch.zeros_like(u)
            dq, dk, dv, dbeta, dg, ds0 = delta_backward(
                TorchOps, q, k, v, beta, g, s0, u, do, dsn, ctx.chunk_size
            )
            return dq, dk, dv, dbeta, dg, ds0, None

    return DeltaRuleFunction


_CLASS = None


def delta_function():
    """The ``torch.autograd.Function`` of the delta rule, created on first use."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _torch_function_class()
    return _CLASS
