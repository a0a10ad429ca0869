"""The delta rules under autograd on the CPU: forward and backward, each one compiled loop per head.

The fused forward of :mod:`dplr.attention._chunked` keeps nothing; under
autograd the backward pass needs the state ``Z`` entering every chunk and the
new values ``v_new`` (``docs/delta.md``, sections 4 and 9).  Here
:func:`forward_saving` runs the same chunk step (the chunked module's
compiled pieces) and also stores those, and :func:`backward` walks each
(sequence, value head) over its chunks in reverse, forming each chunk's
blocks ``I + A`` and ``P`` again from q, k, g in cache instead of reading
them.  With ``kb = beta k``, ``w_in = exp(G)``, ``w_out = exp(G_last - G)``,
``a = exp(G_last)`` (chunk-relative, as in the forward) and ``dZ'`` the
gradient of the state leaving the chunk, per chunk::

    dv_new = P^T dO + (k ⊙ w_out) dZ'
    dr     = (I + A)^-T dv_new                       (back substitution)
    dZ     = a dZ' + (q ⊙ w_in)^T dO - (kb ⊙ w_in)^T dr
    d(kb ⊙ w_in) = -dr Z^T,   d(q ⊙ w_in) = dO Z^T,   d(k ⊙ w_out) = v_new dZ'^T
    dA     = -tril(dr v_new^T, -1),   dP = tril(dO v_new^T)

and the pull-back of the blocks ``A_ij = (kb_i . k_j) D_ij``,
``P_ij = (q_i . k_j) D_ij`` (``D_ij = exp(G_i - G_j)``): ``dkb_i = sum_j
dA_ij D_ij k_j``, ``dk_j = sum_i dA_ij D_ij kb_i`` (P alike) and
``dG_i = rowsum(dA ⊙ A + dP ⊙ P) - colsum(...)``, plus the factors' shares;
``dg`` is the reverse cumulative sum of ``dG`` within the chunk, zero where
``g = -inf``.  Six products of c K V flops per chunk, all in cache; the
separate steps of :mod:`dplr.attention._delta_grad` did seven, each a pass
over whole tensors.

Operands are those of :class:`dplr.attention._delta_grad` 's autograd
function: public layout (B, T, H, .), q already scaled (and normalised),
keys shared over value heads, packed sequences already padded; one decay
per head (or none), float32 or float64 on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._runtime import backend, tuning
from .._runtime.jit import jit
from .._runtime.threads import num_workers, run_all, split
from ..core._decay import _EXPONENT_BUDGET, _FLUSH_BELOW
from ..core._jit import _dot_products
from ._chunked import _buffers, _chunk_step, _factor, _load_chunk, _row_blocks
from ._recurrent import _as_numpy

#: Whether :func:`applies` may choose this path (tests set it False to run
#: the separate steps of :mod:`dplr.attention._delta_grad` on the CPU).
ENABLED = True


def applies(q: Any, g: Any, tensors: tuple[Any, ...]) -> bool:
    """Whether the compiled loops take these torch operands: CPU, float32/float64,
    one dtype, one decay per head or none."""
    import torch

    present = [x for x in tensors if x is not None]
    if not ENABLED or (g is not None and g.ndim == q.ndim):
        return False
    kinds = (torch.float32, torch.float64)
    one_dtype = q.dtype in kinds and all(x.dtype == q.dtype for x in present)
    return one_dtype and backend._all_cpu(*present)


def _limits(dtype: np.dtype) -> tuple[Any, Any]:
    """The flush threshold and exponent budget of the chunked forward, in ``dtype``."""
    dt = dtype.type
    size = dtype.itemsize
    return (dt(_FLUSH_BELOW.get(size, _FLUSH_BELOW[4])),
            dt(_EXPONENT_BUDGET.get(size, _EXPONENT_BUDGET[4])))  # fmt: skip


def _decay4(g: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """g as (B, T, H, E): E = 0 without decay, 1 for one per head."""
    return np.empty((*shape[:3], 0), dtype) if g is None else g[..., None]


def _lane_parts(B: int, H: int, T: int, K: int, V: int) -> list[slice]:
    lanes = B * H
    workers = num_workers() if 6.0 * T * lanes * K * V >= tuning.LOOP_MIN_FLOPS else 1
    return split(lanes, min(lanes, workers * tuning.PARTS_PER_THREAD))


def forward_saving(q, k, v, beta, g, s0, chunk: int):
    """O (B, T, H, V), the final states (B, H, K, V), and what :func:`backward`
    reads: v_new (B, T, H, V) and the state entering every chunk (B, H, nc, K, V).

    torch tensors in, torch tensors out (sharing memory with NumPy arrays).
    """
    import torch

    q, k, v, beta, g, s0 = (_as_numpy(x) for x in (q, k, v, beta, g, s0))
    B, T, H, V = v.shape
    K = k.shape[-1]
    nc = -(-T // chunk)
    out = np.empty((B, T, H, V), v.dtype)
    v_new = np.empty((B, T, H, V), v.dtype)
    states = np.empty((B, H, nc, K, V), v.dtype)
    final = np.empty((B, H, K, V), v.dtype)
    has_s0 = s0 is not None
    s0 = s0 if has_s0 else np.empty((1, 1, 1, 1), v.dtype)
    floor, budget = _limits(v.dtype)
    args = (q, k, v, beta, _decay4(g, v.shape, v.dtype), s0, has_s0, out, v_new, states,
            final, chunk, floor, budget)  # fmt: skip
    run_all(lambda s: _forward_lanes(*args, s.start, s.stop), _lane_parts(B, H, T, K, V))
    return tuple(torch.from_numpy(x) for x in (out, final, v_new, states))


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _forward_lanes(q, k, v, beta, g, s0, has_s0, out, v_new, states, final, chunk, floor,
                   budget, lane_start, lane_stop):  # fmt: skip
    """Lanes ``lane_start:lane_stop`` (lane = batch entry * H + head), chunk by chunk."""
    H, K = q.shape[2], q.shape[3]
    T, V = v.shape[1], v.shape[3]
    E = g.shape[3]
    dt = v.dtype.type
    z_t = np.empty((V, K), v.dtype)  # the state, transposed
    full = _buffers(chunk, K, V, E, v.dtype)
    for lane in range(lane_start, lane_stop):
        b, h = lane // H, lane % H
        for p in range(K):
            for s in range(V):
                z_t[s, p] = s0[b, h, p, s] if has_s0 else dt(0)
        for j in range(states.shape[2]):
            t0 = j * chunk
            L = min(chunk, T - t0)
            buf = full if L == chunk else _buffers(L, K, V, E, v.dtype)
            _load_chunk(q, k, v, beta, g, b, h, h, t0, dt(1), False, floor, budget, buf)
            _row_blocks(buf, floor)
            entering = states[b, h, j]
            for p in range(K):
                for s in range(V):
                    entering[p, s] = z_t[s, p]
            _chunk_step(buf, z_t, out, b, h, t0)
            new = buf[9]
            for i in range(L):
                v_new[b, t0 + i, h] = new[i]
        for p in range(K):
            for s in range(V):
                final[b, h, p, s] = z_t[s, p]


def backward(q, k, v, beta, g, v_new, states, do, dsn, chunk: int):
    """Gradients ``dq, dk, dv, dbeta, dg, ds0`` (torch) of :func:`forward_saving`'s outputs.

    ``do`` (B, T, H, V) and ``dsn`` (B, H, K, V, or None for zero) are the
    gradients of O and of the final states; dg is None without decay.
    """
    import torch

    has_g = g is not None
    q, k, v, beta, g, v_new, states, do, dsn = (
        _as_numpy(x) for x in (q, k, v, beta, g, v_new, states, do, dsn)
    )
    B, T, H, V = v.shape
    K = k.shape[-1]
    dt = v.dtype
    g4 = _decay4(g, v.shape, dt)
    dq, dk = np.empty(q.shape, dt), np.empty(k.shape, dt)
    dv, dbeta, dg = np.empty(v.shape, dt), np.empty(beta.shape, dt), np.empty(g4.shape, dt)
    ds0 = np.empty((B, H, K, V), dt)
    has_dsn = dsn is not None
    dsn = dsn if has_dsn else np.empty((1, 1, 1, 1), dt)
    floor, budget = _limits(dt)
    args = (q, k, v, beta, g4, v_new, states, do, dsn, has_dsn, dq, dk, dv, dbeta, dg, ds0,
            chunk, floor, budget)  # fmt: skip
    run_all(lambda s: _backward_lanes(*args, s.start, s.stop), _lane_parts(B, H, T, K, V))
    grads = [torch.from_numpy(x) for x in (dq, dk, dv, dbeta)]
    grads.append(torch.from_numpy(dg[..., 0]) if has_g else None)
    return (*grads, torch.from_numpy(ds0))


@jit(nogil=True)
def _grad_buffers(L, K, V, dtype):
    """Scratch arrays of the backward pass for a chunk of L tokens."""
    return (
        np.empty((L, K), dtype),  # k ⊙ w_out
        np.empty((2 * L, V), dtype),  # [-dr; dO]
        np.empty((V, 2 * L), dtype),  # its transpose
        np.empty((K, 2 * L), dtype),  # [kb ⊙ w_in; q ⊙ w_in]^T
        np.empty((L, V), dtype),  # v_new of the chunk
        np.empty((L, V), dtype),  # dv_new, then dr
        np.empty((2 * L, K), dtype),  # [d(kb ⊙ w_in); d(q ⊙ w_in)]
        np.empty((L, K), dtype),  # d(k ⊙ w_out)
        np.empty((2 * L, L), dtype),  # [dA; dP] (lower parts read)
        np.empty((L, K), dtype),  # dkb
        np.empty((L, K), dtype),  # dq
        np.empty((L, K), dtype),  # dk
        np.empty(L, dtype),  # dG
    )


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _backward_lanes(q, k, v, beta, g, v_new, states, do, dsn, has_dsn, dq, dk, dv, dbeta, dg,
                    ds0, chunk, floor, budget, lane_start, lane_stop):  # fmt: skip
    """Lanes ``lane_start:lane_stop`` (lane = batch entry * H + head), chunks last first."""
    H, K = q.shape[2], q.shape[3]
    T, V = v.shape[1], v.shape[3]
    E = g.shape[3]
    dt = v.dtype.type
    dz = np.empty((K, V), v.dtype)  # gradient of the state leaving the chunk
    dz_t = np.empty((V, K), v.dtype)
    full = _buffers(chunk, K, V, E, v.dtype)
    full_grad = _grad_buffers(chunk, K, V, v.dtype)
    for lane in range(lane_start, lane_stop):
        b, h = lane // H, lane % H
        for p in range(K):
            for s in range(V):
                dz[p, s] = dsn[b, h, p, s] if has_dsn else dt(0)
        for j in range(states.shape[2] - 1, -1, -1):
            t0 = j * chunk
            L = min(chunk, T - t0)
            buf = full if L == chunk else _buffers(L, K, V, E, v.dtype)
            gb = full_grad if L == chunk else _grad_buffers(L, K, V, v.dtype)
            _load_chunk(q, k, v, beta, g, b, h, h, t0, dt(1), False, floor, budget, buf)
            _row_blocks(buf, floor)
            _chunk_backward(buf, gb, states[b, h, j], dz, dz_t, v_new, do, b, h, t0)
            _chunk_gradients(buf, gb, floor, v, beta, g, dq, dk, dv, dbeta, dg, b, h, t0)
        for p in range(K):
            for s in range(V):
                ds0[b, h, p, s] = dz[p, s]


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunk_backward(buf, gb, z, dz, dz_t, v_new, do, b, h, t0):
    """The products of one chunk: dr, the blocks' and factors' row gradients, dZ (in place).

    ``z`` (K, V) is the state entering the chunk, ``dz`` (K, V) the gradient of
    the one leaving it on entry and of the one entering it on return.
    """
    kq_in, _, _, _, k_out_t, a_blk, p_blk, _, _, _, _, _, _, _, a = buf
    k_out, rd, rd_t, kq_in_t, vn, dr, dkq, dk_out, dap, _, _, _, dgam = gb
    L, V = vn.shape
    K = z.shape[0]
    for i in range(L):
        vn[i] = v_new[b, t0 + i, h]
        rd[L + i] = do[b, t0 + i, h]
        for p in range(K):
            k_out[i, p] = k_out_t[p, i]
    for p in range(K):
        for s in range(V):
            dz_t[s, p] = dz[p, s]
    # The state's decay a = exp(G_last): its gradient <Z, dZ'> (one decay per row).
    zdz = dz.dtype.type(0)
    for p in range(K):
        for s in range(V):
            zdz += z[p, s] * dz[p, s]
    dgam[:] = 0
    dgam[L - 1] = a[0] * zdz
    _dot_products(vn, dz, dk_out)  # d(k ⊙ w_out) = v_new dZ'^T
    _dot_products(k_out, dz_t, dr)  # dv_new = (k ⊙ w_out) dZ' + P^T dO
    for i in range(L):
        doi = rd[L + i]
        for j in range(i + 1):
            pij = p_blk[i, j]
            row = dr[j]
            for s in range(V):
                row[s] += pij * doi[s]
    # dr = (I + A)^-T dv_new: back substitution, rows last first.
    for i in range(L - 1, -1, -1):
        row = dr[i]
        for m in range(i + 1, L):
            coef = a_blk[m, i]
            other = dr[m]
            for s in range(V):
                row[s] -= coef * other[s]
        for s in range(V):
            rd[i, s] = -row[s]
    for r in range(2 * L):
        for s in range(V):
            rd_t[s, r] = rd[r, s]
        for p in range(K):
            kq_in_t[p, r] = kq_in[r, p]
    _dot_products(rd, z, dkq)  # [d(kb ⊙ w_in); d(q ⊙ w_in)] = [-dr; dO] Z^T
    _dot_products(rd, vn, dap)  # [dA; dP] = [-dr; dO] v_new^T
    # dZ = a dZ' + [kb ⊙ w_in; q ⊙ w_in]^T [-dr; dO]
    _dot_products(kq_in_t, rd_t, dz, a[0])


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunk_gradients(buf, gb, floor, v, beta, g, dq, dk, dv, dbeta, dg, b, h, t0):
    """Pull the chunk's row gradients back to q, k, v, beta and g (written in place)."""
    kq_in, kb, qs, kn, _, a_blk, p_blk, _, _, _, _, gc, rc, rows, _ = buf
    k_out, _, _, _, _, dr, dkq, dk_out, dap, dkb, dqs, dkn, dgam = gb
    L, K = kn.shape
    V = dr.shape[1]
    w_in, w_out = rows[:L], rows[L : 2 * L]
    dt = kn.dtype.type
    # The factors: x ⊙ w_in (w_in = exp(G_i)) and k ⊙ w_out (w_out = exp(G_last - G_i)).
    for i in range(L):
        wi, wo = w_in[i, 0], w_out[i, 0]
        s_in = s_out = dt(0)
        for p in range(K):
            dkb[i, p] = wi * dkq[i, p]
            dqs[i, p] = wi * dkq[L + i, p]
            dkn[i, p] = wo * dk_out[i, p]
            s_in += kq_in[i, p] * dkq[i, p] + kq_in[L + i, p] * dkq[L + i, p]
            s_out += k_out[i, p] * dk_out[i, p]
        dgam[i] += s_in - s_out
        dgam[L - 1] += s_out
    # The blocks A_ij = (kb_i . k_j) D_ij, P_ij = (q_i . k_j) D_ij (i > j), P_ii = q_i . k_i.
    for i in range(L):
        for j in range(i):
            da, dp = dap[i, j], dap[L + i, j]
            share = da * a_blk[i, j] + dp * p_blk[i, j]  # dD_ij D_ij, on G_i - G_j
            dgam[i] += share
            dgam[j] -= share
            d_ij = _factor(gc[i, 0] - gc[j, 0], rc[i, 0] == rc[j, 0], floor)
            ea, ep = da * d_ij, dp * d_ij
            for p in range(K):
                dkb[i, p] += ea * kn[j, p]
                dqs[i, p] += ep * kn[j, p]
                dkn[j, p] += ea * kb[i, p] + ep * qs[i, p]
        dp = dap[L + i, i]
        for p in range(K):
            dqs[i, p] += dp * kn[i, p]
            dkn[i, p] += dp * qs[i, p]
    # kb = beta k and the right-hand side beta v; dr is the gradient of beta v.
    for i in range(L):
        t = t0 + i
        bt = beta[b, t, h]
        sb = dt(0)
        for p in range(K):
            sb += kn[i, p] * dkb[i, p]
            dk[b, t, h, p] = dkn[i, p] + bt * dkb[i, p]
            dq[b, t, h, p] = dqs[i, p]
        vi = v[b, t, h]
        for s in range(V):
            sb += vi[s] * dr[i, s]
            dv[b, t, h, s] = bt * dr[i, s]
        dbeta[b, t, h] = sb
    if g.shape[3] > 0:  # G = cumsum(g) from the chunk start: dg_t = sum_{i >= t} dG_i
        acc = dt(0)
        for i in range(L - 1, -1, -1):
            acc += dgam[i]
            dg[b, t0 + i, h, 0] = dt(0) if g[b, t0 + i, h, 0] == -np.inf else acc
