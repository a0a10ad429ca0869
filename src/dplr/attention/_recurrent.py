"""The delta rules token by token, compiled: decode steps and short blocks.

For a few tokens the chunked algorithm's setup (blocks, masks, passes) costs
more than the work.  Here one compiled loop per (sequence, value head) runs
the recurrence directly, reading and writing the K x V state once per token::

    S_t = (I - beta_t k_t k_t^T) Diag(a_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

with ``a_t = exp(g_t)``: one per key channel (KDA), one per head (the gated
rule, broadcast over channels) or 1 (the plain rule).  Expanding the product,

    delta_t = beta_t (v_t - S_{t-1}^T (a_t ⊙ k_t))
    o_t     = S_{t-1}^T (a_t ⊙ q_t) + (k_t . q_t) delta_t
    S_t     = Diag(a_t) S_{t-1} + k_t delta_t^T

so both products with the old state come before the state changes, and the
row-by-row update of ``S_t`` also accumulates the next token's two products
``S_t^T (a_{t+1} ⊙ k_{t+1})`` and ``S_t^T (a_{t+1} ⊙ q_{t+1})``: one pass
over the state per token, 6 K V flops.  The pass runs in one thread per
group of (sequence, head) pairs and releases the GIL.

Forward only: gradients use the chunked algorithm (``delta.py`` chooses).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._runtime import tuning
from .._runtime.backend import Array
from .._runtime.jit import jit
from .._runtime.threads import num_workers, run_all, split


def recurrent_applies(torch: bool, tensors: tuple[Any, ...], longest: int) -> bool:
    """Whether the compiled recurrence should run: short sequences, no autograd, CPU.

    ``longest`` is the longest sequence's length in tokens.
    """
    return longest <= tuning.RECURRENT_MAX_T and runs_compiled(torch, tensors)


def runs_compiled(torch: bool, tensors: tuple[Any, ...], floats_only: bool = False) -> bool:
    """Whether a compiled CPU loop can take these operands: NumPy arrays, or CPU
    tensors outside autograd; with ``floats_only``, float32/float64 only."""
    present = [x for x in tensors if x is not None]
    if not torch:
        return not floats_only or all(x.dtype in (np.float32, np.float64) for x in present)
    import torch as _torch

    kinds = (_torch.float32, _torch.float64)
    if any(x.device.type != "cpu" or (floats_only and x.dtype not in kinds) for x in present):
        return False
    return not (_torch.is_grad_enabled() and any(x.requires_grad for x in present))


def sequence_spans(cu: np.ndarray | None, B: int, T: int) -> tuple[np.ndarray, ...]:
    """(batch row, first token, end token) of every sequence, int64: the B rows
    of the batch, or the packed sequences of ``cu_seqlens`` in row 0."""
    if cu is None:
        return np.arange(B, dtype=np.int64), np.zeros(B, np.int64), np.full(B, T, np.int64)
    n = len(cu) - 1
    return np.zeros(n, np.int64), cu[:-1].astype(np.int64), cu[1:].astype(np.int64)


def decay_per_channel(g: np.ndarray | None, shape: tuple[int, int, int], dtype) -> np.ndarray:
    """g as (B, T, HV, E) for the compiled loops: E = 0 without decay, 1 for one
    decay per head (a view), K per key channel (as given)."""
    if g is None:
        return np.empty((*shape, 0), dtype)
    return g[..., None] if g.ndim == 3 else g


def recurrent_forward(
    torch: bool,
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    g: Array | None,
    s0: Array | None,
    cu: np.ndarray | None,
    scale: float,
    use_qk_l2norm: bool,
    check: bool = False,
) -> tuple[Array, Array] | None:
    """Outputs (B, T, HV, V) and final states (N, HV, K, V) by the token recurrence.

    q, k: (B, T, H, K); v: (B, T, HV, V); beta: (B, T, HV); g: (B, T, HV)
    (one log decay per head), (B, T, HV, K) (per key channel) or None;
    s0: (N, HV, K, V) or None; cu: the validated ``cu_seqlens`` or None.
    All of one compute dtype, float32 or float64, on the CPU; q unscaled.
    Value head h reads key head ``h // (HV // H)``.  With ``check`` the
    compiled loop also tests every input entry it reads (finite; g not NaN
    and not positive) and None is returned if one fails.
    """
    q, k, v, beta, g, s0 = (_as_numpy(x) for x in (q, k, v, beta, g, s0))
    B, T, HV, V = v.shape
    K = k.shape[-1]
    batch, start, stop = sequence_spans(cu, B, T)
    N = len(batch)
    g = decay_per_channel(g, (B, T, HV), v.dtype)
    out = np.empty((B, T, HV, V), v.dtype)
    state = np.empty((N, HV, K, V), v.dtype)
    has_s0 = s0 is not None
    if not has_s0:
        s0 = np.empty((N, HV, K, V), v.dtype)  # never read
    args = (q, k, v, beta, g, s0, state, out, batch, start, stop,
            v.dtype.type(scale), use_qk_l2norm, has_s0, check)  # fmt: skip
    lanes = N * HV
    work = B * T * HV * K * V  # tokens x state entries: the sequences tile the batch's rows
    parts = min(num_workers(), lanes) if work >= tuning.RECURRENT_PARALLEL_MIN_WORK else 1
    if not all(run_all(lambda s: _recurrent_lanes(*args, s.start, s.stop), split(lanes, parts))):
        return None
    if torch:
        import torch as _torch

        return _torch.from_numpy(out), _torch.from_numpy(state)
    return out, state


def recurrent_direct(q, k, v, beta, g, s0, scale, use_qk_l2norm, per_channel):
    """The recurrence on the caller's arrays as given, or None where it does not apply.

    The decode step's entry: a call of ``gated_delta_rule`` (or the others)
    for one token costs about as much in checks and conversions at the
    boundary as in the work itself (a pass over the K x V states).  Here,
    when the arguments are already what the compiled loop takes (all NumPy
    arrays or all CPU tensors outside autograd, C-contiguous, one dtype
    float32 or float64, the shapes of ``delta_rule`` with 1 <= T <=
    :data:`~dplr._runtime.tuning.RECURRENT_MAX_T` and no empty axis, no
    ``cu_seqlens``), the loop runs directly and tests the values it reads
    itself.  None asks the caller to take the general path: the arguments
    are of another kind, or a value failed (the general path then names it).
    """
    if q is None or k is None or v is None or beta is None:
        return None  # the general entry names the missing one
    present = [x for x in (q, k, v, beta, g, s0) if x is not None]
    kind = type(q)
    if kind is np.ndarray:
        dtype = q.dtype
        if dtype not in (np.float32, np.float64):
            return None
        for x in present:
            if type(x) is not np.ndarray or x.dtype != dtype or not x.flags.c_contiguous:
                return None
        torch = False
    else:
        try:
            import torch as _torch
        except ImportError:
            return None
        if kind is not _torch.Tensor or q.dtype not in (_torch.float32, _torch.float64):
            return None
        grad = _torch.is_grad_enabled()
        for x in present:
            if (type(x) is not _torch.Tensor or x.dtype != q.dtype or x.device.type != "cpu"
                    or not x.is_contiguous() or (grad and x.requires_grad)):  # fmt: skip
                return None
        torch = True
    if not _shapes_fit(q, k, v, beta, g, s0, per_channel):
        return None
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, float) or not math.isfinite(scale):
        return None
    return recurrent_forward(torch, q, k, v, beta, g, s0, None, scale, use_qk_l2norm, check=True)


def _shapes_fit(q, k, v, beta, g, s0, per_channel: bool) -> bool:
    """The shapes of the delta rules with 1 <= T <= RECURRENT_MAX_T and no empty axis."""
    if q.ndim != 4 or v.ndim != 4:
        return False
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if min(B, H, HV, K, V) < 1 or not 1 <= T <= tuning.RECURRENT_MAX_T or HV % H:
        return False
    if tuple(k.shape) != (B, T, H, K) or tuple(v.shape[:2]) != (B, T):
        return False
    if tuple(beta.shape) != (B, T, HV):
        return False
    if g is not None and tuple(g.shape) != ((B, T, HV, K) if per_channel else (B, T, HV)):
        return False
    return s0 is None or tuple(s0.shape) == (B, HV, K, V)


def _as_numpy(x: Array | None) -> np.ndarray | None:
    """A C-contiguous NumPy array (a view of a contiguous CPU tensor, no copy)."""
    if x is None:
        return None
    if not isinstance(x, np.ndarray):
        x = x.detach().numpy()
    return np.ascontiguousarray(x)


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _recurrent_lanes(q, k, v, beta, g, s0, state, out, batch, start, stop, scale,
                     l2norm, has_s0, check, lane_start, lane_stop):  # fmt: skip
    """Run lanes ``lane_start:lane_stop`` (lane = sequence * HV + value head).

    q, k: (B, T, H, K); v, out: (B, T, HV, V); beta: (B, T, HV); g: (B, T,
    HV, G) with G = 0 (no decay), 1 (per head) or K (per channel); s0, state:
    (N, HV, K, V); sequence n is ``batch[n], start[n]:stop[n]``.  Returns
    False if ``check`` and an entry read is NaN or Inf (g: NaN, +Inf or > 0).
    """
    H, K = q.shape[2], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    dt = v.dtype.type
    # Two sets of token vectors: this token's (parity p) and the next one's (1 - p).
    qs = np.empty((2, K), v.dtype)  # scaled, normalised query
    kt = np.empty((2, K), v.dtype)  # normalised key
    decay = np.empty((2, K), v.dtype)  # a = exp(g), per channel
    sk = np.empty(V, v.dtype)  # S^T (a ⊙ k) with the state before the token
    sq = np.empty(V, v.dtype)  # S^T (a ⊙ q)
    delta = np.empty(V, v.dtype)
    # x - x is 0 for finite x and NaN for NaN or Inf (not folded: no nnan/ninf flags).
    nonfinite = np.zeros(V, v.dtype)
    clean = True
    for lane in range(lane_start, lane_stop):
        n, h = lane // HV, lane % HV
        b, hk = batch[n], h // group
        s = state[n, h]
        if stop[n] == start[n]:
            for i in range(K):
                for j in range(V):
                    s[i, j] = s0[n, h, i, j] if has_s0 else dt(0)
            if check and has_s0:  # the state is all an empty sequence reads
                for i in range(K):
                    for j in range(V):
                        nonfinite[j] += s[i, j] - s[i, j]
            continue
        t0 = start[n]
        if check:
            clean &= _token_clean(q[b, t0, hk], k[b, t0, hk], v[b, t0, h], beta[b, t0, h],
                                  g[b, t0, h])  # fmt: skip
        _token_vectors(q[b, t0, hk], k[b, t0, hk], g[b, t0, h], scale, l2norm,
                       qs[0], kt[0], decay[0])  # fmt: skip
        sk[:] = 0
        sq[:] = 0
        if has_s0:
            src = s0[n, h]
            for i in range(K):
                row, qi, ki = src[i], decay[0, i] * qs[0, i], decay[0, i] * kt[0, i]
                if check:
                    for j in range(V):
                        sk[j] += ki * row[j]
                        sq[j] += qi * row[j]
                        nonfinite[j] += row[j] - row[j]
                else:
                    for j in range(V):
                        sk[j] += ki * row[j]
                        sq[j] += qi * row[j]
        for t in range(t0, stop[n]):
            p = (t - t0) & 1
            bt = beta[b, t, h]
            kq = dt(0)
            for i in range(K):
                kq += kt[p, i] * qs[p, i]
            vt, ot = v[b, t, h], out[b, t, h]
            for j in range(V):
                delta[j] = bt * (vt[j] - sk[j])
                ot[j] = sq[j] + kq * delta[j]
            last = t + 1 == stop[n]
            if not last:  # the next token's vectors, for the products fused below
                if check:
                    clean &= _token_clean(q[b, t + 1, hk], k[b, t + 1, hk], v[b, t + 1, h],
                                          beta[b, t + 1, h], g[b, t + 1, h])  # fmt: skip
                _token_vectors(q[b, t + 1, hk], k[b, t + 1, hk], g[b, t + 1, h], scale,
                               l2norm, qs[1 - p], kt[1 - p], decay[1 - p])  # fmt: skip
                sk[:] = 0
                sq[:] = 0
            fresh = t == t0 and not has_s0  # the state before is zero
            for i in range(K):
                a_i, k_i = decay[p, i], kt[p, i]
                row = s[i]
                if fresh:
                    for j in range(V):
                        row[j] = k_i * delta[j]
                elif t == t0:  # two loops: one that picks its source row does not vectorise
                    row_in = s0[n, h, i]
                    for j in range(V):
                        row[j] = a_i * row_in[j] + k_i * delta[j]
                else:
                    for j in range(V):
                        row[j] = a_i * row[j] + k_i * delta[j]
                if not last:
                    qi = decay[1 - p, i] * qs[1 - p, i]
                    ki = decay[1 - p, i] * kt[1 - p, i]
                    for j in range(V):
                        sk[j] += ki * row[j]
                        sq[j] += qi * row[j]
    if check:
        for j in range(V):
            clean &= nonfinite[j] == 0
    return clean


@jit(nogil=True)
def _token_clean(q, k, v, beta, g) -> bool:
    """Whether one token's inputs are finite and its log decays ``<= 0`` (-Inf allowed)."""
    total = beta - beta
    for i in range(q.shape[0]):
        total += (q[i] - q[i]) + (k[i] - k[i])
    for j in range(v.shape[0]):
        total += v[j] - v[j]
    for i in range(g.shape[0]):
        if not g[i] <= 0:
            return False
    return total == 0


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _token_vectors(q, k, g, scale, l2norm, qs, kt, decay):
    """Fill ``qs = scale * q``, ``kt = k`` (unit norm with ``l2norm``) and ``decay = exp(g)``.

    g has 0 entries (no decay), 1 (one per head) or K (one per channel).
    """
    K = q.shape[0]
    dt = qs.dtype.type
    qn = kn = dt(1)
    if l2norm:
        sq = sk = dt(0)
        for i in range(K):
            sq += q[i] * q[i]
            sk += k[i] * k[i]
        tiny = np.finfo(qs.dtype).tiny
        qn = dt(1) / np.sqrt(max(sq, tiny))
        kn = dt(1) / np.sqrt(max(sk, tiny))
    for i in range(K):
        qs[i] = scale * (q[i] * qn)
        kt[i] = k[i] * kn
    if g.shape[0] == 0:
        decay[:] = 1
    elif g.shape[0] == 1:
        decay[:] = np.exp(g[0])
    else:
        for i in range(K):
            decay[i] = np.exp(g[i])
