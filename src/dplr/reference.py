"""Plain reference implementations: each operation written as its definition.

Slow, obvious and independent of the fast paths, which never import this
module. The tests compare the library against these functions and the
benchmarks time them as baselines, so that one definition serves both.
Every function takes NumPy arrays or torch tensors (then it is
differentiable, so autograd through it is a reference for the gradients) and
computes in the dtype it is given.

- :func:`tril_dense`: the matrix ``T = diag(lam) + tril(Q K^T ⊙ D, -1)``.
- :func:`delta_rule_recurrent` and :func:`gated_delta_rule_recurrent`: the
  (gated) delta rule token by token, in the layout of :func:`dplr.delta_rule`.
- :func:`kda_recurrent`: Kimi Delta Attention (one decay per key channel)
  token by token, in the layout of :func:`dplr.kda`, with grouped value heads
  (:func:`expand_key_heads`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "delta_rule_recurrent",
    "expand_key_heads",
    "gated_delta_rule_recurrent",
    "kda_recurrent",
    "tril_dense",
]


def _is_torch(x: Any) -> bool:
    """True for a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch")


def tril_dense(q: Any, k: Any, lam: Any = None, log_decay: Any = None) -> Any:
    """The dense ``n x n`` matrix ``T = diag(lam) + tril(Q K^T ⊙ D, -1)``.

    Parameters
    ----------
    q, k : (..., n, d) ndarray or torch.Tensor
        The low-rank factors.
    lam : (..., n) array, optional
        The diagonal (ones if omitted).
    log_decay : (..., n) array, optional
        Logarithms of the per-row decays ``a_i``; the decay mask is
        ``D_ij = a_{j+1} ... a_i = exp(G_i - G_j)`` with ``G = cumsum(log_decay)``.

    Returns
    -------
    (..., n, n) ndarray or torch.Tensor
        ``T[..., i, i] = lam_i`` and ``T[..., i, j] = (q_i . k_j) D_ij`` for
        ``j < i``; zero above the diagonal.

    Notes
    -----
    O(n² d) time and O(n²) memory: for tests and small examples only.

    Examples
    --------
    >>> import numpy as np
    >>> q, k = np.ones((3, 1)), np.full((3, 1), 2.0)
    >>> np.allclose(tril_dense(q, k), [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    True
    """
    n = q.shape[-2]
    if _is_torch(q):
        import torch

        below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        low = q @ k.mT
        if log_decay is not None:
            cum = log_decay.cumsum(-1)
            exponent = (cum[..., :, None] - cum[..., None, :]).masked_fill(~below, -torch.inf)
            low = low * torch.exp(exponent)
        low = low.masked_fill(~below, 0.0)
        diagonal = torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device) if lam is None else lam
        return low + torch.diag_embed(diagonal)
    below = np.tri(n, k=-1, dtype=bool)
    out = np.matmul(q, np.swapaxes(k, -1, -2), dtype=np.result_type(q, k))
    if log_decay is not None:
        cum = np.cumsum(log_decay, -1)
        out *= np.exp(np.where(below, cum[..., :, None] - cum[..., None, :], -np.inf))
    out[..., ~below] = 0.0  # in place: one n x n array at n = 16384 is already 2 GiB
    idx = np.arange(n)
    out[..., idx, idx] = 1.0 if lam is None else lam
    return out


def delta_rule_recurrent(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[Any, Any]:
    """The delta rule token by token: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    Parameters
    ----------
    q, k : (B, T, H, K) ndarray or torch.Tensor
        Queries and keys.
    v : (B, T, H, V) array
        Values.
    beta : (B, T, H) array
        Writing strengths.
    scale : float, optional
        Factor of the outputs (default ``K ** -0.5``).
    initial_state : (B, H, K, V) array, optional
        ``S_0`` (zeros if omitted).
    use_qk_l2norm : bool
        Normalise each query and key to unit Euclidean norm first.

    Returns
    -------
    o : (B, T, H, V) array
        ``o_t = scale * S_t^T q_t``.
    final_state : (B, H, K, V) array
        ``S_T``.

    Notes
    -----
    O(T H K V) time in T sequential steps, each one vectorised over batch
    and heads: the plain recurrent form that chunked algorithms are judged
    against.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.ones((1, 1, 1, 1)); v = np.full((1, 1, 1, 1), 3.0)
    >>> o, s = delta_rule_recurrent(k, k, v, np.full((1, 1, 1), 0.5), scale=1.0)
    >>> np.allclose(o, 1.5) and np.allclose(s, 1.5)
    True
    """
    return _recurrence(q, k, v, beta, None, scale, initial_state, use_qk_l2norm)


def gated_delta_rule_recurrent(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[Any, Any]:
    """The gated delta rule token by token:
    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    Parameters
    ----------
    q, k, v, beta, scale, initial_state, use_qk_l2norm
        As in :func:`delta_rule_recurrent`.
    g : (B, T, H) array
        Log decays (``g <= 0`` for a decay).

    Returns
    -------
    o, final_state
        As in :func:`delta_rule_recurrent`.

    Notes
    -----
    O(T H K V) time in T sequential steps, vectorised over batch and heads.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.ones((1, 2, 1, 1)); v = np.ones((1, 2, 1, 1))
    >>> g = np.log(np.full((1, 2, 1), 0.5))
    >>> o, s = gated_delta_rule_recurrent(k, k, v, g, np.ones((1, 2, 1)), scale=1.0)
    >>> np.allclose(o[0, :, 0, 0], [1.0, 1.0]) and np.allclose(s, 1.0)
    True
    """
    return _recurrence(q, k, v, beta, g, scale, initial_state, use_qk_l2norm)


def _recurrence(q, k, v, beta, g, scale, initial_state, use_qk_l2norm):
    """Shared loop of the three recurrences.

    ``g`` is None (no decay), (B, T, HV) (one decay per head) or (B, T, HV, K)
    (one per key channel); key heads are shared by value heads as in
    :func:`expand_key_heads`.
    """
    torch_in = _is_torch(q)
    if use_qk_l2norm:
        q, k = (x / ((x * x).sum(-1, keepdims=True) ** 0.5) for x in (q, k))
    q, k = expand_key_heads(q, v.shape[2]), expand_key_heads(k, v.shape[2])
    batch, length, heads, dim_k = q.shape
    scale = dim_k**-0.5 if scale is None else scale
    if torch_in:
        import torch

        state = q.new_zeros(batch, heads, dim_k, v.shape[-1])
        exp, concat = torch.exp, torch.cat
    else:
        state = np.zeros((batch, heads, dim_k, v.shape[-1]), np.result_type(q, k, v))
        exp, concat = np.exp, np.concatenate
    if initial_state is not None:
        state = state + initial_state
    if length == 0:  # no token: an empty output, the state unchanged
        return (v.clone() if torch_in else v.copy()), state
    # Per token, heads first: q_t, k_t^T (B, H, 1, K), k_t (B, H, K, 1),
    # v_t (B, H, 1, V), beta_t (B, H, 1, 1); split once, outside the loop.
    steps = [_tokens(x) for x in (q[..., None, :], k[..., None, :], k[..., None], v[..., None, :],
                                  beta[..., None, None])]  # fmt: skip
    if g is None:
        decays = [None] * length
    else:  # a_t: (B, H, 1, 1) per head or (B, H, K, 1) per key channel (row c of S)
        decays = _tokens(exp(g)[..., None, None] if g.ndim == 3 else exp(g)[..., None])
    outputs = []
    for q_t, kr_t, kc_t, v_t, b_t, a_t in zip(*steps, decays, strict=True):
        if a_t is not None:
            state = a_t * state
        # delta_t = beta_t (v_t - k_t^T S): the value written, the old one it replaces removed.
        delta_t = b_t * (v_t - kr_t @ state)
        state = state + kc_t * delta_t
        outputs.append(q_t @ state)
    out = concat(outputs, -2)  # (B, H, T, V)
    return scale * (out.transpose(1, 2) if torch_in else np.swapaxes(out, 1, 2)), state


def _tokens(x: Any) -> list[Any]:
    """The slices ``x[:, t]`` of a (B, T, H, ...) array, moved to (B, H, ...)."""
    if _is_torch(x):
        return list(x.transpose(1, 2).unbind(2))
    return [x[:, t] for t in range(x.shape[1])]


def kda_recurrent(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[Any, Any]:
    """Kimi Delta Attention token by token:
    ``S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T``.

    Parameters
    ----------
    q, k : (B, T, H, K) ndarray or torch.Tensor
        Queries and keys.
    v : (B, T, HV, V) array
        Values; HV is a multiple of H and value head i reads key head
        ``i // (HV // H)``.
    g : (B, T, HV, K) array
        Log decay of each key channel (``-inf`` zeroes that channel).
    beta : (B, T, HV) array
        Writing strengths.
    scale : float, optional
        Factor of the outputs (default ``K ** -0.5``).
    initial_state : (B, HV, K, V) array, optional
        ``S_0`` (zeros if omitted).
    use_qk_l2norm : bool
        Normalise each query and key to unit Euclidean norm first.

    Returns
    -------
    o : (B, T, HV, V) array
        ``o_t = scale * S_t^T q_t``.
    final_state : (B, HV, K, V) array
        ``S_T``.

    Notes
    -----
    O(T HV K V) time in T sequential steps, vectorised over batch and heads.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.ones((1, 2, 1, 2)) / np.sqrt(2); v = np.ones((1, 2, 1, 1))
    >>> g = np.log(np.full((1, 2, 1, 2), 0.5))
    >>> o, s = kda_recurrent(k, k, v, g, np.ones((1, 2, 1)), scale=1.0)
    >>> np.allclose(s, np.sqrt(0.5)) and np.allclose(o[0, :, 0, 0], [1.0, 1.0])
    True
    """
    return _recurrence(q, k, v, beta, g, scale, initial_state, use_qk_l2norm)


def expand_key_heads(x: Any, value_heads: int) -> Any:
    """(B, T, H, K) -> (B, T, HV, K): value head i reads key head ``i // (HV // H)``.

    Written as an index (differentiable with torch: the gradient of a key head
    sums over the value heads that read it).
    """
    heads = x.shape[2]
    if value_heads == heads:
        return x
    index = np.arange(value_heads) // (value_heads // heads)
    if _is_torch(x):
        import torch

        return x[:, :, torch.as_tensor(index, device=x.device)]
    return x[:, :, index]
