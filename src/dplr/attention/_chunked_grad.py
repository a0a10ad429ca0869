"""The delta rules under autograd on the CPU: forward and backward, each one compiled loop per head.

The fused forward of :mod:`dplr.attention._chunked` keeps nothing; under
autograd the backward pass needs the state ``S`` entering every chunk, the
new values ``v_new`` and the chunks' blocks ``I + A`` and ``P``
(``docs/delta.md``, sections 4 and 9).  Here :func:`forward_saving` runs the
same chunk step (the chunked module's compiled pieces) and also stores
those (the blocks with one decay per row or none: 2 c^2 numbers against the
state's K V), and :func:`backward` walks each (sequence, value head) over
its chunks in reverse, reading them; per key channel it forms the anchored
blocks again from q, k, g in cache.  With ``kb = beta k``, ``w_in = exp(G)``,
``w_out = exp(G_last - G)``, ``a = exp(G_last)`` (chunk-relative, as in the forward) and ``dS'`` the
gradient of the state leaving the chunk, per chunk::

    dv_new = P^T dO + (k ⊙ w_out) dS'
    dr     = (I + A)^-T dv_new                       (back substitution)
    dS     = a dS' + (q ⊙ w_in)^T dO - (kb ⊙ w_in)^T dr
    d(kb ⊙ w_in) = -dr S^T,   d(q ⊙ w_in) = dO S^T,   d(k ⊙ w_out) = v_new dS'^T
    dA     = -tril(dr v_new^T, -1),   dP = tril(dO v_new^T)

and the pull-back of the blocks ``A_ij = (kb_i . k_j) D_ij``,
``P_ij = (q_i . k_j) D_ij`` (``D_ij = exp(G_i - G_j)``): ``dkb_i = sum_j
dA_ij D_ij k_j``, ``dk_j = sum_i dA_ij D_ij kb_i`` (P alike) and
``dG_i = rowsum(dA ⊙ A + dP ⊙ P) - colsum(...)``, plus the factors' shares;
``dg`` is the reverse cumulative sum of ``dG`` within the chunk, zero where
``g = -inf``.  Six products of c K V flops per chunk, BLAS gemm calls from
the compiled loop (:mod:`dplr._runtime.gemm`) on operands in cache; the
separate steps of :mod:`dplr.attention._delta_grad` did seven, each a pass
over whole tensors.

Operands are in the public layout (B, T, H, .), one decay per head, per key
channel (KDA; its pull-back in :mod:`dplr.attention._channel_grad`) or
none, float32 or float64 on the CPU.  :func:`rule_function` takes raw q, k
and scales, normalises (``use_qk_l2norm``) and shares key heads among value
heads in the loops, whose backward applies the normalisation's gradient
``dx = (dy - y (y . dy)) / |x|`` and sums over each group; packed sequences
(``cu_seqlens``) go through :mod:`dplr.attention._delta_grad` 's autograd
function, padded, which calls the same loops with scale 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._runtime import backend, tuning
from .._runtime.blas import single_threaded_blas
from .._runtime.gemm import gemm, gemm_both, gemm_scratch
from .._runtime.jit import jit
from .._runtime.prefetch import prefetch_contiguous_outer, prefetch_rows
from .._runtime.stream import stream_fence, stream_rows
from .._runtime.threads import num_workers, run_all, split
from .._runtime.workspace import recycled
from ..core._jit import back_substitute
from ._channel_grad import _channel_blocks_back, _channel_factors_back
from ._chunked import (
    _buffers,
    _channel_blocks,
    _chunk_step,
    _load_chunk,
    _row_blocks,
    _row_steps,
    decay_limits,
    prefetch_inputs,
)
from ._recurrent import _as_numpy, decay_per_channel

#: Whether :func:`applies` may choose this path (tests set it False to run
#: the separate steps of :mod:`dplr.attention._delta_grad` on the CPU).
ENABLED = True


def applies(q: Any, g: Any, tensors: tuple[Any, ...]) -> bool:
    """Whether the compiled loops take these torch operands: CPU, float32/float64, one dtype."""
    import torch

    present = [x for x in tensors if x is not None]
    if not ENABLED:
        return False
    kinds = (torch.float32, torch.float64)
    one_dtype = q.dtype in kinds and all(x.dtype == q.dtype for x in present)
    return one_dtype and backend._all_cpu(*present)


def _torch_function_class():
    import torch

    from ..core._grad import first_order_only

    class ChunkedRuleFunction(torch.autograd.Function):
        """``(O, S_n)`` of the delta rules from raw q, k (scaled and normalised
        in the loops, key heads shared by value heads) with the compiled backward."""

        @staticmethod
        def forward(ctx, q, k, v, beta, g, s0, scale, l2norm, chunk):
            o, sn, v_new, states, blocks = forward_saving(q, k, v, beta, g, s0, chunk, scale,
                                                          l2norm)  # fmt: skip
            ctx.save_for_backward(q, k, v, beta, g, v_new, states, blocks)
            ctx.args = (s0 is not None, chunk, scale, l2norm)
            return o, sn

        @staticmethod
        @first_order_only("dplr.delta_rule")
        def backward(ctx, do, dsn):
            q, k, v, beta, g, v_new, states, blocks = ctx.saved_tensors
            has_s0, chunk, scale, l2norm = ctx.args
            if do is None:
                do = torch.zeros(v.shape, dtype=v.dtype)
            dq, dk, dv, dbeta, dg, ds0 = backward(
                q, k, v, beta, g, v_new, states, blocks, do, dsn, chunk, scale, l2norm
            )
            return dq, dk, dv, dbeta, dg, ds0 if has_s0 else None, None, None, None

    return ChunkedRuleFunction


_CLASS = None


def rule_function():
    """The ``torch.autograd.Function`` of the compiled loops, created on first use.

    ``apply(q, k, v, beta, g, s0, scale, l2norm, chunk)`` with raw q, k
    (B, T, H, K), v (B, T, HV, V), one packed-free batch; returns O and S_n.
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = _torch_function_class()
    return _CLASS


def _lane_parts(B: int, H: int, T: int, K: int, V: int) -> list[slice]:
    lanes = B * H
    workers = num_workers() if 6.0 * T * lanes * K * V >= tuning.LOOP_MIN_FLOPS else 1
    return split(lanes, min(lanes, workers * tuning.PARTS_PER_THREAD))


def forward_saving(q, k, v, beta, g, s0, chunk: int, scale: float = 1.0, l2norm: bool = False):
    """O (B, T, HV, V), the final states (B, HV, K, V), and what :func:`backward`
    reads: v_new (B, T, HV, V), the state entering every chunk (B, HV, nc, K, V)
    and, with one decay per row (or none), every chunk's blocks ``I + A`` and
    ``P`` (B, HV, nc, 2, chunk, chunk; a chunk of L < chunk tokens fills
    ``[:L, :L]``).  Per key channel (KDA) the backward forms the blocks again,
    and the last array has empty blocks.

    q, k (B, T, H, K) are scaled by ``scale`` (after normalising them with
    ``l2norm``) in the loop; value head h reads key head ``h // (HV // H)``.
    torch tensors in, torch tensors out (sharing memory with NumPy arrays).
    """
    import torch

    q, k, v, beta, g, s0 = (_as_numpy(x) for x in (q, k, v, beta, g, s0))
    B, T, HV, V = v.shape
    K = k.shape[-1]
    nc = -(-T // chunk)
    out = recycled((B, T, HV, V), v.dtype)
    v_new = recycled((B, T, HV, V), v.dtype)
    states = recycled((B, HV, nc, K, V), v.dtype)
    final = recycled((B, HV, K, V), v.dtype)
    g4 = decay_per_channel(g, v.shape[:3], v.dtype)
    side = chunk if g4.shape[3] <= 1 else 0  # no decay or one per row
    blocks = recycled((B, HV, nc, 2, side, side), v.dtype)
    has_s0 = s0 is not None
    s0 = s0 if has_s0 else np.empty((1, 1, 1, 1), v.dtype)
    floor, budget = decay_limits(v.dtype)
    args = (q, k, v, beta, g4, s0, has_s0, out, v_new, states, blocks, final, chunk,
            v.dtype.type(scale), l2norm, floor, budget)  # fmt: skip
    with single_threaded_blas():  # small products: one BLAS thread in each of dplr's
        run_all(lambda s: _forward_lanes(*args, s.start, s.stop), _lane_parts(B, HV, T, K, V))
    return tuple(torch.from_numpy(x) for x in (out, final, v_new, states, blocks))


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _forward_lanes(q, k, v, beta, g, s0, has_s0, out, v_new, states, blocks, final, chunk, scale,
                   l2norm, floor, budget, lane_start, lane_stop):  # fmt: skip
    """Lanes ``lane_start:lane_stop`` (lane = batch entry * HV + value head), chunk by chunk."""
    H, K = q.shape[2], q.shape[3]
    T, HV, V = v.shape[1], v.shape[2], v.shape[3]
    E = g.shape[3]
    s_vnew = np.empty((K + chunk, V), v.dtype)  # the state (K rows), then the chunk's v_new
    full = _buffers(chunk, K, V, E, v.dtype)
    scratch = gemm_scratch(v.dtype)
    for lane in range(lane_start, lane_stop):
        b, h = lane // HV, lane % HV
        if has_s0:
            s_vnew[:K] = s0[b, h]
        else:
            s_vnew[:K] = 0
        for j in range(states.shape[2]):
            t0 = j * chunk
            L = min(chunk, T - t0)
            buf = full if L == chunk else _buffers(L, K, V, E, v.dtype)
            hk = h // (HV // H)
            _load_chunk(q, k, v, beta, g, b, hk, h, t0, scale, l2norm, floor, budget, buf)
            if E > 1:
                _channel_blocks(buf, floor, budget)
            else:
                _row_blocks(buf, floor)
                blocks[b, h, j, 0, :L, :L] = buf[5]
                blocks[b, h, j, 1, :L, :L] = buf[6]
            # Written once, read by the backward: streaming stores (no read for ownership).
            stream_rows(states[b, h, j], s_vnew[:K])
            if t0 + L < T:  # the next chunk's rows, one page each
                t1 = min(t0 + L + chunk, T)
                prefetch_inputs(q, k, v, beta, g, b, hk, h, t0 + L, t1)
            _chunk_step(buf, s_vnew, out, b, h, t0, scratch)
            stream_rows(v_new[b, t0 : t0 + L, h], s_vnew[K : K + L])
        final[b, h] = s_vnew[:K]
    stream_fence()


def backward(q, k, v, beta, g, v_new, states, blocks, do, dsn, chunk: int, scale: float = 1.0,
             l2norm: bool = False):  # fmt: skip
    """Gradients ``dq, dk, dv, dbeta, dg, ds0`` (torch) of :func:`forward_saving`'s outputs.

    ``do`` (B, T, HV, V) and ``dsn`` (B, HV, K, V, or None for zero) are the
    gradients of O and of the final states; dg is None without decay.  The
    gradients of q and k sum over the value heads that share them.
    """
    import torch

    has_g = g is not None
    q, k, v, beta, g, v_new, states, blocks, do, dsn = (
        _as_numpy(x) for x in (q, k, v, beta, g, v_new, states, blocks, do, dsn)
    )
    B, T, HV, V = v.shape
    H, K = k.shape[2], k.shape[3]
    dt = v.dtype
    g4 = decay_per_channel(g, v.shape[:3], dt)
    # Per value head: value heads sharing a key head may run in different threads.
    dq, dk = recycled((B, T, HV, K), dt), recycled((B, T, HV, K), dt)
    dv, dbeta, dg = recycled(v.shape, dt), recycled(beta.shape, dt), recycled(g4.shape, dt)
    ds0 = recycled((B, HV, K, V), dt)
    has_dsn = dsn is not None
    dsn = dsn if has_dsn else np.empty((1, 1, 1, 1), dt)
    floor, budget = decay_limits(dt)
    args = (q, k, v, beta, g4, v_new, states, blocks, do, dsn, has_dsn, dq, dk, dv, dbeta, dg, ds0,
            chunk, dt.type(scale), l2norm, floor, budget)  # fmt: skip
    with single_threaded_blas():
        run_all(lambda s: _backward_lanes(*args, s.start, s.stop), _lane_parts(B, HV, T, K, V))
    if HV != H:
        dq, dk = (x.reshape(B, T, H, HV // H, K).sum(3) for x in (dq, dk))
    grads = [torch.from_numpy(x) for x in (dq, dk, dv, dbeta)]
    grads.append(None if not has_g else torch.from_numpy(dg if g.ndim == 4 else dg[..., 0]))
    return (*grads, torch.from_numpy(ds0))


@jit(nogil=True)
def _prefetch_chunk(q, k, v, beta, g, v_new, do, b, hk, h, t0, t1):
    """Prefetch the rows the backward reads for tokens t0:t1 (its gradients' rows are
    written by streaming stores, which read nothing)."""
    prefetch_inputs(q, k, v, beta, g, b, hk, h, t0, t1)
    for x in (v_new, do):
        prefetch_rows(x[b, t0:t1, h], 0, x.shape[3])


@jit(nogil=True)
def _grad_buffers(L, K, V, E, dtype):
    """Scratch arrays of the backward pass for a chunk of L tokens (E as ``g``'s last axis)."""
    kc = K if E > 1 else 0  # per-channel decay only
    return (
        np.empty((2 * L, V), dtype),  # [-dr; dO]
        np.empty((L, V), dtype),  # dv_new, then dr, then dv = beta dr
        np.empty((2 * L, K), dtype),  # [d(kb ⊙ w_in); d(q ⊙ w_in)]
        np.empty((L, K), dtype),  # d(k ⊙ w_out)
        np.empty((2 * L, L), dtype),  # [dA; dP] (lower parts read)
        np.empty((L, K), dtype),  # dkb
        np.empty((L, K), dtype),  # dq
        np.empty((L, K), dtype),  # dk
        np.empty((L, max(E, 1)), dtype),  # dG
        np.empty((2 * L, kc), dtype),  # w_in, w_out (the chunk rows overwrite them)
        np.empty((4 * L, kc), dtype),  # anchor weights, d(anchored kb, q, k) rows
        np.empty((V, L), dtype),  # v_new^T
    )


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _backward_lanes(q, k, v, beta, g, v_new, states, blocks, do, dsn, has_dsn, dq, dk, dv, dbeta,
                    dg, ds0, chunk, scale, l2norm, floor, budget, lane_start,
                    lane_stop):  # fmt: skip
    """Lanes ``lane_start:lane_stop`` (lane = batch entry * HV + value head), chunks last first."""
    H, K = q.shape[2], q.shape[3]
    T, HV, V = v.shape[1], v.shape[2], v.shape[3]
    E = g.shape[3]
    ds = np.empty((K, V), v.dtype)  # gradient of the state leaving the chunk
    full = _buffers(chunk, K, V, E, v.dtype)
    full_grad = _grad_buffers(chunk, K, V, E, v.dtype)
    scratch = gemm_scratch(v.dtype)
    for lane in range(lane_start, lane_stop):
        b, h = lane // HV, lane % HV
        hk = h // (HV // H)
        if has_dsn:
            ds[:] = dsn[b, h]
        else:
            ds[:] = 0
        for j in range(states.shape[2] - 1, -1, -1):
            t0 = j * chunk
            L = min(chunk, T - t0)
            if j > 0:  # the rows of the chunk before, one page each: ask for them now
                _prefetch_chunk(q, k, v, beta, g, v_new, do, b, hk, h, t0 - chunk, t0)
                prefetch_contiguous_outer(states[b, h, j - 1])  # 64 KB at K = V = 128
                prefetch_contiguous_outer(blocks[b, h, j - 1])
            buf = full if L == chunk else _buffers(L, K, V, E, v.dtype)
            gb = full_grad if L == chunk else _grad_buffers(L, K, V, E, v.dtype)
            _load_chunk(q, k, v, beta, g, b, hk, h, t0, scale, l2norm, floor, budget, buf)
            if E > 1:
                gb[9][:] = buf[11][: 2 * L]  # w_in, w_out, before the blocks reuse the rows
                _channel_blocks(buf, floor, budget)
            else:  # the forward's blocks, and the factors their pull-back reads
                buf[5][:] = blocks[b, h, j, 0, :L, :L]
                buf[6][:] = blocks[b, h, j, 1, :L, :L]
                _row_steps(buf, floor)
            vn = v_new[b, t0 : t0 + L, h]
            _chunk_backward(buf, gb, states[b, h, j], ds, vn, do[b, t0 : t0 + L, h], scratch)
            _chunk_gradients(buf, gb, floor, budget, q, k, v, beta, g, dq, dk, dv, dbeta, dg, b,
                             hk, h, t0, scale, l2norm, scratch)  # fmt: skip
        ds0[b, h] = ds
    stream_fence()


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunk_backward(buf, gb, s, ds, vn, do, scratch):
    """The products of one chunk: dr, the blocks' and factors' row gradients, dS (in place).

    ``s`` (K, V) is the state entering the chunk, ``ds`` (K, V) the gradient
    of the one leaving it on entry and of the one entering it on return;
    ``vn`` and ``do`` (L, V) the chunk's v_new and output gradient (rows of
    the public layout).  The products are BLAS calls.
    """
    kb_in, _, _, _, k_out, a_blk, p_blk, _, qp, _, _, _, a = buf
    rd, dr, dkq, dk_out, dap, _, _, _, dgam, _, _, vn_t = gb
    L, V = dr.shape
    K = s.shape[0]
    per_channel = dgam.shape[1] > 1
    rd[L:] = do
    # The state's decay a = exp(G_last): its gradient <S, dS'> (per row of S per channel).
    dgam[:] = 0
    for p in range(K):
        sds = ds.dtype.type(0)
        for col in range(V):
            sds += s[p, col] * ds[p, col]
        if per_channel:
            dgam[L - 1, p] = a[p] * sds
        else:
            dgam[L - 1, 0] += a[0] * sds
    # v_new^T makes the two products with v_new^T of OpenBLAS's fastest kinds at these
    # sizes (A^T B^T and A B: 1.9x and 1.6x the A B^T they replace, docs/delta.md, section 8).
    _transpose(vn, vn_t)
    gemm_both(vn_t, ds, dk_out, 1.0, 0.0, True, True, scratch)  # d(k ⊙ w_out) = v_new dS'^T
    gemm(k_out, ds, dr, 1.0, 0.0, False, scratch)  # dv_new = (k ⊙ w_out) dS' + P^T dO
    gemm(p_blk, rd[L:], dr, 1.0, 1.0, True, scratch)  # P is 0 above its diagonal
    back_substitute(a_blk, dr, scratch)  # dr = (I + A)^-T dv_new
    for i in range(L):
        for col in range(V):
            rd[i, col] = -dr[i, col]
    gemm_both(rd, s, dkq, 1.0, 0.0, False, True, scratch)  # [d(kb ⊙ w_in); d(q ⊙ w_in)]
    gemm(rd, vn_t, dap, 1.0, 0.0, False, scratch)  # [dA; dP] = [-dr; dO] v_new^T
    # dS = a dS' - (kb ⊙ w_in)^T dr + (q ⊙ w_in)^T dO
    if per_channel:
        for p in range(K):
            ap = a[p]
            for col in range(V):
                ds[p, col] *= ap
    gemm(kb_in, rd[:L], ds, 1.0, 1.0 if per_channel else a[0], True, scratch)
    gemm(qp[:, :K], rd[L:], ds, 1.0, 1.0, True, scratch)


@jit(nogil=True)
def _transpose(x, out):
    """``out = x.T`` for x (r, s), in tiles of 16 x 16 (both arrays' rows contiguous)."""
    r, s = x.shape
    for i0 in range(0, r, 16):
        i1 = min(i0 + 16, r)
        for j0 in range(0, s, 16):
            for j in range(j0, min(j0 + 16, s)):
                for i in range(i0, i1):
                    out[j, i] = x[i, j]


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunk_gradients(buf, gb, floor, budget, q, k, v, beta, g, dq, dk, dv, dbeta, dg, b, hk, h,
                     t0, scale, l2norm, scratch):  # fmt: skip
    """Pull the chunk's row gradients back to q, k, v, beta and g (written in place;
    dq, dk per value head h, of key head hk)."""
    kb_in, kb, qs, kn, k_out, _, _, _, qp, gc, rc, rows, _ = buf
    _, _, dkq, dk_out, dap, dkb, dqs, dkn, dgam, wio, work, _ = gb
    L = kn.shape[0]
    dt = kn.dtype.type
    if dgam.shape[1] > 1:  # per key channel
        _channel_factors_back(kb_in, qp, k_out, wio, dkq, dk_out, dkb, dqs, dkn, dgam)
        e_a, e_p = dap[:L], dap[L:]
        for i in range(L):
            for j in range(i, L):
                e_a[i, j] = dt(0)
            for j in range(i + 1, L):
                e_p[i, j] = dt(0)
        _channel_blocks_back(kb, qs, kn, gc, rc, rows, e_a, e_p, dkb, dqs, dkn, dgam, work,
                             floor, budget, scratch)  # fmt: skip
    else:
        _row_factors_blocks_back(buf, gb, floor, scratch)
    _rows_back(buf, gb, q, k, v, beta, g, dq, dk, dv, dbeta, dg, b, hk, h, t0, scale, l2norm)


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _row_factors_blocks_back(buf, gb, floor, scratch):
    """One decay per row: the factors' and blocks' shares of dkb, dq, dk and dG."""
    kb_in, kb, qs, kn, k_out, a_blk, p_blk, _, qp, _, _, rows, _ = buf
    _, _, dkq, dk_out, dap, dkb, dqs, dkn, dgam, _, _, _ = gb
    L, K = kn.shape
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
            s_in += kb_in[i, p] * dkq[i, p] + qp[i, p] * dkq[L + i, p]
            s_out += k_out[i, p] * dk_out[i, p]
        dgam[i, 0] += s_in - s_out
        dgam[L - 1, 0] += s_out
    # The blocks A_ij = (kb_i . k_j) D_ij, P_ij = (q_i . k_j) D_ij (i > j), P_ii = q_i . k_i:
    # dA, dP become E_A = dA ⊙ D, E_P = dP ⊙ D (D_ii = 1, zero above the diagonal), then
    # dkb += E_A k, dq += E_P k, dk += E_A^T kb + E_P^T q (four products).
    # D_ij as the forward formed it: running products of the per-token factors that
    # _row_blocks left in rows[2L:3L, 0] (none when K = 0, where the products are empty).
    e_a, e_p = dap[:L], dap[L:]
    tiny = dt(np.exp(-floor))
    for i in range(L):
        d_ij = dt(1)
        for j in range(i - 1, -1, -1):
            da, dp = e_a[i, j], e_p[i, j]
            share = da * a_blk[i, j] + dp * p_blk[i, j]  # dD_ij D_ij, on G_i - G_j
            dgam[i, 0] += share
            dgam[j, 0] -= share
            if K > 0:
                d_ij *= rows[2 * L + j + 1, 0]
                d_ij = d_ij if d_ij >= tiny else dt(0)
            e_a[i, j], e_p[i, j] = da * d_ij, dp * d_ij
        e_a[i, i] = dt(0)
        for j in range(i + 1, L):
            e_a[i, j] = e_p[i, j] = dt(0)
    gemm(e_a, kn, dkb, 1.0, 1.0, False, scratch)
    gemm(e_p, kn, dqs, 1.0, 1.0, False, scratch)
    gemm(e_a, kb, dkn, 1.0, 1.0, True, scratch)
    gemm(e_p, qs, dkn, 1.0, 1.0, True, scratch)


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _rows_back(buf, gb, q, k, v, beta, g, dq, dk, dv, dbeta, dg, b, hk, h, t0, scale, l2norm):
    """From kb = beta k, beta v, the scale and the normalisation to the inputs' rows, and
    dg = the reverse cumulative sum of dG (0 where g = -inf)."""
    _, _, _, kn, _, _, _, _, _, _, _, _, _ = buf
    _, dr, _, _, _, dkb, dqs, dkn, dgam, _, _, _ = gb
    L, K = kn.shape
    V = dr.shape[1]
    dt = kn.dtype.type
    for i in range(L):
        t = t0 + i
        bt = beta[b, t, h]
        sb = dt(0)
        for p in range(K):
            sb += kn[i, p] * dkb[i, p]
            dkn[i, p] += bt * dkb[i, p]
            dqs[i, p] *= scale
        _unit_rows_back(q[b, t, hk], dqs[i], dqs[i], l2norm)
        _unit_rows_back(k[b, t, hk], dkn[i], dkn[i], l2norm)
        vi = v[b, t, h]
        for s in range(V):
            sb += vi[s] * dr[i, s]
            dr[i, s] *= bt
        dbeta[b, t, h] = sb
    # Written once, read after the loop: streaming stores (no read for ownership).
    stream_rows(dq[b, t0 : t0 + L, h], dqs)
    stream_rows(dk[b, t0 : t0 + L, h], dkn)
    stream_rows(dv[b, t0 : t0 + L, h], dr)
    for e in range(g.shape[3]):  # G = cumsum(g) from the chunk start: dg_t = sum_{i >= t} dG_i
        acc = dt(0)
        for i in range(L - 1, -1, -1):
            acc += dgam[i, e]
            dg[b, t0 + i, h, e] = dt(0) if g[b, t0 + i, h, e] == -np.inf else acc


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _unit_rows_back(x, dy, dx, l2norm):
    """``dx`` of ``y = x / |x|`` (``|x|`` at least sqrt(tiny), as in the forward) given ``dy``:
    ``dx = (dy - y (y . dy)) / |x|``; ``dx = dy`` without ``l2norm``."""
    K = x.shape[0]
    if not l2norm:
        for p in range(K):
            dx[p] = dy[p]
        return
    dt = dx.dtype.type
    tiny = np.finfo(dx.dtype).tiny
    sq = dt(0)
    for p in range(K):
        sq += x[p] * x[p]
    r = dt(1) / np.sqrt(max(sq, tiny))
    proj = dt(0)
    if sq >= tiny:  # below it the norm is the constant sqrt(tiny): no projection
        for p in range(K):
            proj += x[p] * dy[p]
        proj *= r * r
    for p in range(K):
        dx[p] = (dy[p] - x[p] * proj) * r
