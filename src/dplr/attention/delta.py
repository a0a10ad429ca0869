"""The delta rule (DeltaNet) and the gated delta rule, exactly, in O(T).

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

with ``a_t = exp(g_t)`` (``a_t = 1`` for the plain rule).  Over a sequence the
recurrence is one solve with the core structure :class:`dplr.LowRankTril`
followed by a product with it (``docs/delta.md``); both run chunk by chunk in
:mod:`dplr.core._kernels`, and torch gradients use the hand-written backward of
:mod:`dplr.attention._delta_grad` (on the CPU, the compiled loops of
:mod:`dplr.attention._chunked_grad`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._runtime.backend import Array, backend_of, is_torch
from .._runtime.blas import single_threaded_blas
from .._validate import (
    Prepared,
    check_choice,
    check_cu_seqlens,
    check_delta_shapes,
    finite_scalar,
    positive_int,
    prepare,
    require_present,
    shape_error,
    to_output,
)
from ..core._kernels import effective_chunk
from . import _chunked_grad
from ._chunked import chunked_applies, chunked_forward
from ._delta_grad import delta_forward_passes, delta_function
from ._recurrent import recurrent_applies, recurrent_direct, recurrent_forward, runs_compiled

__all__ = ["delta_rule", "gated_delta_rule", "run_delta_rule"]

#: Values of ``method``: the compiled token recurrence, the chunked algorithm,
#: or a choice by length.
METHODS = ("auto", "chunked", "recurrent")


def delta_rule(
    q: Any, k: Any, v: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, method: str = "auto",
) -> tuple[Array, Array | None]:  # fmt: skip
    """Outputs of the delta rule ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    Parameters
    ----------
    q, k : (B, T, H, K) array_like
        Queries and keys.  For the state to stay bounded, rows of k should
        have norm 1 (see ``use_qk_l2norm``) and beta lie in [0, 2].
    v : (B, T, HV, V) array_like
        Values.  HV is a multiple of H: value head i reads the queries and
        keys of head ``i // (HV // H)`` (grouped value heads; HV = H is the
        ungrouped rule).
    beta : (B, T, HV) array_like
        Write strengths.
    scale : float, optional
        Output scale, a finite real number; default ``K ** -0.5`` (1 when
        K = 0, where every output is 0).
    initial_state : (N, HV, K, V) array_like, optional
        ``S_0`` for each sequence (N = B, or the number of sequences given by
        ``cu_seqlens``); default zeros.
    output_final_state : bool, default False
        Also return the state after the last token of each sequence.
    cu_seqlens : (N + 1,) int array_like, optional
        Boundaries of N sequences packed along T (requires B == 1):
        sequence i is ``[cu_seqlens[i], cu_seqlens[i + 1])``, starting from
        its own initial state.  Must start at 0, not decrease and end at T;
        empty sequences are allowed.
    chunk_size : int, optional
        Tokens per chunk of the chunked algorithm (default 32).  Only speed
        depends on it.
    method : {"auto", "chunked", "recurrent"}, default "auto"
        ``"recurrent"``: a compiled loop token by token (forward only: NumPy,
        or torch CPU tensors without ``requires_grad`` or under
        ``torch.no_grad()``), fastest for decode steps and blocks of a few
        tokens.  ``"chunked"``: the chunked algorithm; without a gradient on
        the CPU its solve and product run fused in one compiled loop over the
        chunks (float32/float64).  ``"auto"`` runs the recurrence for
        sequences of at most 8 tokens where it can (and no ``chunk_size`` is
        given), the chunked algorithm otherwise.  Only speed depends on the
        choice.
    use_qk_l2norm : bool, default False
        Normalise q and k to unit L2 norm over K first (zero rows stay zero);
        differentiable like the rest.

    Returns
    -------
    o : (B, T, HV, V) array
        ``o_t = scale * S_t^T q_t``, in the inputs' library, device and dtype.
    final_state : (N, HV, K, V) array or None
        ``S_T`` of every sequence if ``output_final_state``, else None.

    Raises
    ------
    ValueError
        Mismatched shapes, bad ``cu_seqlens`` (not starting at 0, decreasing,
        not ending at T, or given with B != 1), NaN or Inf in the input, a
        ``scale`` that is NaN or Inf, an unknown ``method``, or
        ``method="recurrent"`` where the compiled recurrence cannot run (a
        gradient is required, a tensor is not on the CPU, or ``chunk_size``
        is given).
    TypeError
        A missing (None) q, k, v or beta, complex or non-numeric input, or
        NumPy and torch inputs mixed.

    Notes
    -----
    With ``T = I + tril(diag(beta) K K^T, -1)``, the new values
    ``U = T^-1 (beta ⊙ (V - K S_0))`` give ``O = scale * (tril(Q K^T) U + Q S_0)``
    and ``S_T = S_0 + K^T U`` (``docs/delta.md``).  Chunks of c tokens cost
    O(T c (K + V) + T K V) flops per head and O(T (K + V + c)) memory; no
    T x T matrix is formed.  float16 and bfloat16 compute in float32.  With
    T = 0 the outputs are empty and the final state is a copy of
    ``initial_state``.  With
    torch, gradients flow to q, k, v, beta and ``initial_state`` through a
    hand-written backward that stores the inputs, the new values, the
    state entering each chunk and the chunks' c x c blocks, 2 T c numbers
    per head (on the CPU in float32/float64, one compiled loop per head in
    each direction).  Grouped value heads
    share q and k; the gradients of q and k sum over each group.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> B, T, H, K, V = 1, 200, 2, 8, 4
    >>> q, k = rng.standard_normal((2, B, T, H, K))
    >>> k /= np.linalg.norm(k, axis=-1, keepdims=True)
    >>> v, beta = rng.standard_normal((B, T, H, V)), rng.uniform(0, 1, (B, T, H))
    >>> o, s = dplr.delta_rule(q, k, v, beta, output_final_state=True)
    >>> S = np.zeros((B, H, K, V))                    # the recurrence, token by token
    >>> for t in range(T):
    ...     kt, bt, vt = k[:, t, :, :, None], beta[:, t, :, None, None], v[:, t, :, None, :]
    ...     S = S - bt * kt * (kt.swapaxes(-1, -2) @ S) + bt * kt * vt
    >>> o_last = (q[:, -1, :, None, :] @ S)[..., 0, :] / np.sqrt(K)
    >>> np.allclose(s, S), np.allclose(o[:, -1], o_last)
    (True, True)
    """
    return run_delta_rule(
        q, k, v, beta, None, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, method=method,
    )  # fmt: skip


def gated_delta_rule(
    q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, method: str = "auto",
) -> tuple[Array, Array | None]:  # fmt: skip
    """Outputs of the gated delta rule, ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + ...``.

    Parameters
    ----------
    q, k, v, beta
        As in :func:`delta_rule`.
    g : (B, T, HV) array_like
        Log decay, ``g <= 0``: ``a_t = exp(g_t)``.  ``g = 0`` is the plain
        rule; ``g = -inf`` is ``a_t = 0``, a full reset of the state.  Every
        entry enters (``g[:, 0]`` decays ``initial_state``).
    scale, initial_state, output_final_state, cu_seqlens, chunk_size, use_qk_l2norm, method
        As in :func:`delta_rule`.

    Returns
    -------
    o : (B, T, HV, V) array
    final_state : (N, HV, K, V) array or None

    Raises
    ------
    ValueError
        As :func:`delta_rule`, and for positive ``g`` (NaN or +Inf in ``g``;
        -Inf is allowed).
    TypeError
        As :func:`delta_rule`, and for ``g=None`` (use :func:`delta_rule`).

    Notes
    -----
    The decay enters ``T`` and the output product as the mask
    ``D[i, j] = exp(G_i - G_j)``, ``G = cumsum(g)``, formed only relative to
    the start of each chunk, so no exponent is positive however long the
    sequence.  Cost as :func:`delta_rule`; torch gradients also reach g.

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 100, 1, 4))
    >>> k /= np.linalg.norm(k, axis=-1, keepdims=True)
    >>> v, beta = rng.standard_normal((1, 100, 1, 3)), np.full((1, 100, 1), 0.5)
    >>> o, _ = dplr.gated_delta_rule(q, k, v, np.zeros((1, 100, 1)), beta)
    >>> np.allclose(o, dplr.delta_rule(q, k, v, beta)[0])
    True
    """
    require_present({"g": g})  # None would silently mean the plain rule
    return run_delta_rule(
        q, k, v, beta, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, method=method,
    )  # fmt: skip


# ------------------------------------------------------------------------------ helpers
def share_key_heads(x: Array, groups: int) -> Array:
    """(B, T, H, K) -> (B, T, H * groups, K): value head i reads key head i // groups.

    The ``repeat_interleave`` convention of the model libraries; with torch,
    the gradient of the copy sums each group back onto its key head.
    """
    if groups == 1:
        return x
    if is_torch(x):
        return x.repeat_interleave(groups, dim=2)
    return np.repeat(x, groups, axis=2)


def _l2norm(x: Array, torch: bool) -> Array:
    """Rows of unit L2 norm over the last axis; zero rows stay zero."""
    if torch:
        import torch as _torch

        sq = (x * x).sum(-1, keepdim=True)
        return x * sq.clamp_min(_torch.finfo(x.dtype).tiny).rsqrt()
    sq = (x * x).sum(-1, keepdims=True)
    return x / np.sqrt(np.maximum(sq, np.finfo(x.dtype).tiny))


# ------------------------------------------------------------------------------- driver
def run_delta_rule(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens,
                   chunk_size, use_qk_l2norm, method="auto", per_channel=False):  # fmt: skip
    """The delta rules' common driver: validate, share key heads, pack, run, unpack.

    ``g`` None (plain rule), (B, T, HV) (gated) or, with ``per_channel``,
    (B, T, HV, K) (KDA).
    """
    if method in ("auto", "recurrent") and chunk_size is None and cu_seqlens is None:
        direct = recurrent_direct(q, k, v, beta, g, initial_state, scale, use_qk_l2norm,
                                  per_channel)  # fmt: skip
        if direct is not None:  # a decode step: the inputs were checked inside the loop
            return direct[0], (direct[1] if output_final_state else None)
    gated = g is not None
    chunk_size = positive_int("chunk_size", chunk_size)
    check_choice("method", method, METHODS)
    require_present({"q": q, "k": k, "v": v, "beta": beta})
    p = prepare(
        {"q": q, "k": k, "v": v, "beta": beta, "g": g, "initial_state": initial_state},
        log_decays=("g",),
        skippable=False,
    )
    B, T, H, HV, K, V = check_delta_shapes(p, gated, per_channel)
    cu = check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu is None else len(cu) - 1
    s0 = p["initial_state"]
    if s0 is not None and tuple(s0.shape) != (N, HV, K, V):
        why = "" if cu is None else " (N = len(cu_seqlens) - 1)"
        raise shape_error("initial_state", f"(N, HV, K, V) = {(N, HV, K, V)}", s0.shape, why)
    # With K = 0 every output is an empty sum, 0, whatever the scale.
    scale = (K**-0.5 if K else 1.0) if scale is None else finite_scalar("scale", scale)
    q, k, v, beta, g = p["q"], p["k"], p["v"], p["beta"], p["g"]
    longest = T if cu is None else int(np.diff(cu).max())
    if _recurrence_chosen(method, chunk_size, p.torch, (q, k, v, beta, g, s0), longest):
        o, sn = recurrent_forward(p.torch, q, k, v, beta, g, s0, cu, scale, use_qk_l2norm)
        return to_output(o, p), (to_output(sn, p) if output_final_state else None)
    if longest and chunked_applies(p.torch, (q, k, v, beta, g, s0)):
        c = effective_chunk(longest, chunk_size)
        o, sn = chunked_forward(p.torch, q, k, v, beta, g, s0, cu, scale, use_qk_l2norm, c)
        return to_output(o, p), (to_output(sn, p) if output_final_state else None)
    if p.torch and cu is None and longest and _chunked_grad.applies(q, g, (q, k, v, beta, g, s0)):
        # Under autograd on the CPU: scaling, normalising and sharing heads in the loops too.
        c = effective_chunk(longest, chunk_size)
        o, sn = _chunked_grad.rule_function().apply(q, k, v, beta, g, s0, scale, use_qk_l2norm, c)
        return to_output(o, p), (to_output(sn, p) if output_final_state else None)
    if use_qk_l2norm:
        q, k = _l2norm(q, p.torch), _l2norm(k, p.torch)
    groups = HV // H if H else 1
    q, k = share_key_heads(q * scale, groups), share_key_heads(k, groups)
    if cu is not None:
        q, k, v, beta, g, valid = _pack(p.torch, cu, q, k, v, beta, g)
    o, sn = _run(p, q, k, v, beta, g, s0, chunk_size)
    if cu is not None:
        o = o[valid][None]
    o = to_output(o, p)
    return o, (to_output(sn, p) if output_final_state else None)


def _recurrence_chosen(method: str, chunk_size: int | None, torch: bool, tensors, longest: int):
    """Whether ``method`` (validated) runs the compiled recurrence; raises where it cannot."""
    if method == "chunked":
        return False
    if method == "auto":
        return chunk_size is None and recurrent_applies(torch, tensors, longest)
    if chunk_size is not None:
        raise ValueError("method='recurrent' has no chunks: give chunk_size only with 'chunked'")
    if not runs_compiled(torch, tensors):
        raise ValueError(
            "method='recurrent' runs forward only, on NumPy arrays or CPU tensors outside "
            "autograd; use method='chunked' (or 'auto') for gradients and other devices"
        )
    return True


def _run(p: Prepared, q, k, v, beta, g, s0, chunk_size) -> tuple[Array, Array]:
    """The forward pass (and torch autograd): O (B, T, H, V) and S_T (B, H, K, V)."""
    B, T, H, K = k.shape
    ops = backend_of(k)
    if T == 0:  # the final state is S_0, as a new array: never the caller's object
        state = ops.zeros((B, H, K, v.shape[-1]), v) if s0 is None else ops.copy(s0)
        return ops.zeros(v.shape, v), state
    if p.torch:
        import torch

        inputs = (q, k, v, beta, g, s0)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
            return delta_function().apply(q, k, v, beta, g, s0, chunk_size)
        o, sn, _ = delta_forward_passes(ops, *inputs, chunk_size, for_backward=False)
        return o, sn
    with single_threaded_blas():
        o, sn, _ = delta_forward_passes(ops, q, k, v, beta, g, s0, chunk_size,
                                           for_backward=False)  # fmt: skip
    return o, sn


def _pack(torch: bool, cu: np.ndarray, *xs: Array | None):
    """Gather packed sequences (1, T, ...) into a zero-padded batch (N, Tmax, ...).

    Padding rows have k = 0, beta = 0 and g = 0, so they leave the state as it
    is: outputs at valid rows and final states are exact.  Returns the padded
    arrays and the (N, Tmax) mask of valid rows (row-major order is the packed
    order, so ``o[valid]`` unpacks).
    """
    lengths = np.diff(cu)
    tmax = int(lengths.max())
    steps = np.arange(tmax)
    valid = steps[None, :] < lengths[:, None]
    index = np.where(valid, cu[:-1, None] + steps[None, :], 0)
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        # where, not a product: a log decay of -inf times 0 would be NaN.
        if torch:
            import torch as _torch

            idx = _torch.as_tensor(index, device=x.device)
            mask = _torch.as_tensor(valid, device=x.device)
            shape = (*mask.shape, *([1] * (x.ndim - 2)))
            out.append(_torch.where(mask.reshape(shape), x[0][idx], 0.0))
        else:
            shape = (*valid.shape, *([1] * (x.ndim - 2)))
            out.append(np.where(valid.reshape(shape), x[0][index], 0.0).astype(x.dtype))
    if torch:
        import torch as _torch

        valid = _torch.as_tensor(valid, device=xs[0].device)
    return (*out, valid)
