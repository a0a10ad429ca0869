"""Kimi Delta Attention (KDA): the delta rule with one decay per key channel, exactly, in O(T).

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

Over a sequence this is the delta rule's pipeline (``docs/delta.md``) with a
per-channel log decay: one solve with :class:`dplr.LowRankTril` whose strict
lower part is ``sum_c beta_i k_ic k_jc exp(G_ic - G_jc)``, then one product
with the same structure.  Both, and the gradients, are the core's
(``docs/kda.md``); this module only states the public contract.
"""

from __future__ import annotations

from typing import Any

from .._runtime.backend import Array
from .._validate import require_present
from .delta import run_delta_rule

__all__ = ["kda"]


def kda(
    q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: float | None = None,
    initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
    chunk_size: int | None = None, use_qk_l2norm: bool = False, method: str = "auto",
) -> tuple[Array, Array | None]:  # fmt: skip
    """Outputs of KDA, ``S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T``.

    Parameters
    ----------
    q, k : (B, T, H, K) array_like
        Queries and keys.  For the state to stay bounded, rows of k should
        have norm 1 (see ``use_qk_l2norm``) and beta lie in [0, 2].
    v : (B, T, HV, V) array_like
        Values.  HV is a multiple of H: value head i reads the queries and
        keys of head ``i // (HV // H)``.
    g : (B, T, HV, K) array_like
        Log decay of each key channel, ``g <= 0``: channel c of the state is
        multiplied by ``exp(g_t[c])`` before token t is written;
        ``g = -inf`` resets that channel exactly.
    beta : (B, T, HV) array_like
        Write strengths.
    scale : float, optional
        Output scale, a finite real number; default ``K ** -0.5``.
    initial_state : (N, HV, K, V) array_like, optional
        ``S_0`` for each sequence (N = B, or the number of sequences given by
        ``cu_seqlens``); default zeros.
    output_final_state : bool, default False
        Also return the state after the last token of each sequence.
    cu_seqlens : (N + 1,) int array_like, optional
        Boundaries of N sequences packed along T (requires B == 1), as in
        :func:`dplr.delta_rule`; empty sequences are allowed.
    chunk_size : int, optional
        Tokens per chunk (default 32).  Only speed depends on it.
    method : {"auto", "chunked", "recurrent"}, default "auto"
        The compiled token recurrence or the chunked algorithm, as in
        :func:`dplr.delta_rule`.
    use_qk_l2norm : bool, default False
        Normalise q and k to unit L2 norm over K first (zero rows stay zero).

    Returns
    -------
    o : (B, T, HV, V) array
        ``o_t = scale * S_t^T q_t``, in the inputs' library, device and dtype.
    final_state : (N, HV, K, V) array or None
        ``S_T`` of every sequence if ``output_final_state``, else None.

    Raises
    ------
    ValueError
        Mismatched shapes (HV not a multiple of H included), bad
        ``cu_seqlens``, NaN or Inf in the input (``g`` may hold ``-inf``),
        positive ``g``, an unknown ``method`` or ``method="recurrent"`` where
        the compiled recurrence cannot run (as in :func:`dplr.delta_rule`).
    TypeError
        Complex or non-numeric input, NumPy and torch inputs mixed, or a
        required array (``g`` included) given as None.

    Notes
    -----
    With ``G = cumsum(g)`` per channel and ``T = I + tril(diag(beta) A, -1)``,
    ``A_ij = sum_c k_ic k_jc exp(G_ic - G_jc)``, the new values
    ``U = T^-1 (beta ⊙ (V - (K ⊙ exp(G)) S_0))`` give
    ``O = scale * (P U + (Q ⊙ exp(G)) S_0)`` with ``P_ij = sum_c q_ic k_jc
    exp(G_ic - G_jc)`` for ``j <= i``, and ``S_T`` is the solve's final state
    (``docs/kda.md``).  The exponentials are anchored inside sub-blocks of
    each chunk so that none overflows, and a ``-inf`` decay is an exact zero.
    Chunks of c tokens cost O(T c (K + V) + T K V) flops per head and
    O(T (K + V + c)) memory; no tensor of size T x c x K is formed.  With
    torch, gradients reach q, k, v, g, beta and ``initial_state`` through a
    hand-written backward that stores the inputs, the new values and the
    state entering each chunk (on the CPU in float32/float64, a compiled
    loop per head that forms the chunks' blocks again; elsewhere also the
    blocks, 2 T c numbers per head).

    Examples
    --------
    >>> import numpy as np, dplr
    >>> rng = np.random.default_rng(0)
    >>> B, T, H, K, V = 1, 100, 2, 8, 4
    >>> q, k = rng.standard_normal((2, B, T, H, K))
    >>> k /= np.linalg.norm(k, axis=-1, keepdims=True)
    >>> v, beta = rng.standard_normal((B, T, H, V)), rng.uniform(0, 1, (B, T, H))
    >>> g = -rng.uniform(0, 1, (B, T, H, K))
    >>> o, s = dplr.kda(q, k, v, g, beta, output_final_state=True)
    >>> S = np.zeros((B, H, K, V))                    # the recurrence, token by token
    >>> for t in range(T):
    ...     kt, bt, vt = k[:, t, :, :, None], beta[:, t, :, None, None], v[:, t, :, None, :]
    ...     S = np.exp(g[:, t, :, :, None]) * S
    ...     S = S - bt * kt * (kt.swapaxes(-1, -2) @ S) + bt * kt * vt
    >>> o_last = (q[:, -1, :, None, :] @ S)[..., 0, :] / np.sqrt(K)
    >>> np.allclose(s, S), np.allclose(o[:, -1], o_last)
    (True, True)
    """
    require_present({"g": g})  # None would silently mean the plain rule
    return run_delta_rule(
        q, k, v, beta, g, per_channel=True, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, method=method,
    )  # fmt: skip
