"""The chunked forward pass of the delta rules in one compiled loop per head (no gradient).

Without a gradient to compute, the solve ``T v_new = beta ⊙ (V - ...)`` and
the output product ``O = P v_new + ...`` of ``docs/delta.md`` need not be
separate passes over the sequence: both read the same state entering each
chunk.  Here one compiled loop per (sequence, value head) walks the chunks
once and, for chunk J with state ``S`` (K x V) entering it, forms in cache

    A = tril(kb k^T ⊙ D, -1),  P = tril(q k^T ⊙ D)      (c x c, D_ij = exp(g_i - g_j))
    v_new = (I + A)^-1 (beta v - (kb ⊙ w_in) S)          (forward substitution)
    O_J = [q ⊙ w_in | P] [S; v_new]
    S  <- a S + (k ⊙ w_out)^T v_new

with ``kb = beta k``, ``g`` the cumulative log decay from the chunk start,
``w_in = exp(g)``, ``w_out = exp(g_last - g)`` and ``a = exp(g_last)``: the
quantities of :func:`dplr.core._kernels.make_chunked`, and the arithmetic of
the core's :func:`~dplr.core._kernels.solve` and
:func:`~dplr.core._kernels.matmul_from_states` (its compiled blocks and
substitution are reused).  The three products with the state are BLAS
gemm calls from the compiled loop (:mod:`dplr._runtime.gemm`, one BLAS
thread inside each of dplr's threads).  The inputs are read in the public layout
([B, T, H, K]) and normalised and scaled in the loop, the outputs written in
place: no chunk blocks, decay masks, per-chunk states, copies to a heads-first
layout or elementwise passes over whole tensors.  Packed sequences are read
where they lie (no padding).  Decay factors are formed relative to the chunk
start exactly as in the core (resets exact, factors below the dtype's flush
threshold zero).

With one decay per key channel (KDA) the blocks A and P are formed from
rows rescaled per sub-block (anchored, as the core's
:func:`dplr.core._decay.channel_strict_blocks`), and the state decays by
``Diag(a)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._runtime import tuning
from .._runtime.backend import Array
from .._runtime.blas import single_threaded_blas
from .._runtime.gemm import gemm, gemm_scratch
from .._runtime.jit import jit
from .._runtime.prefetch import prefetch_entries, prefetch_rows
from .._runtime.stream import stream_fence, stream_rows
from .._runtime.threads import num_workers, run_all, split
from .._runtime.workspace import recycled
from ..core._decay import _EXPONENT_BUDGET, _FLUSH_BELOW
from ..core._jit import _forward_substitute, _strict_lower_product
from ._recurrent import _as_numpy, decay_per_channel, runs_compiled, sequence_spans


def chunked_applies(torch: bool, tensors: tuple[Any, ...]) -> bool:
    """Whether the compiled chunked forward runs: CPU, float32/float64, no autograd."""
    return runs_compiled(torch, tensors, floats_only=True)


def decay_limits(dtype: np.dtype) -> tuple[Any, Any]:
    """The flush threshold and the exponent budget of the per-channel blocks, in ``dtype``."""
    size, dt = dtype.itemsize, dtype.type
    return (dt(_FLUSH_BELOW.get(size, _FLUSH_BELOW[4])),
            dt(_EXPONENT_BUDGET.get(size, _EXPONENT_BUDGET[4])))  # fmt: skip


def chunked_forward(
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
    chunk: int,
) -> tuple[Array, Array]:
    """Outputs (B, T, HV, V) and final states (N, HV, K, V) by chunks of ``chunk`` tokens.

    Arguments as :func:`dplr.attention._recurrent.recurrent_forward` (g one
    log decay per head (B, T, HV), per key channel (B, T, HV, K), or None),
    all of one dtype on the CPU.
    """
    q, k, v, beta, g, s0 = (_as_numpy(x) for x in (q, k, v, beta, g, s0))
    B, T, HV, V = v.shape
    K = k.shape[-1]
    batch, start, stop = sequence_spans(cu, B, T)
    N = len(batch)
    g = decay_per_channel(g, (B, T, HV), v.dtype)
    out = recycled((B, T, HV, V), v.dtype)
    state = recycled((N, HV, K, V), v.dtype)
    has_s0 = s0 is not None
    if not has_s0:
        s0 = np.empty((1, 1, 1, 1), v.dtype)  # never read
    dt = v.dtype.type
    floor, budget = decay_limits(v.dtype)
    args = (q, k, v, beta, g, s0, has_s0, state, out, batch, start, stop,
            dt(scale), use_qk_l2norm, max(1, chunk), floor, budget)  # fmt: skip
    lanes = N * HV
    flops = 6.0 * int((stop - start).sum()) * HV * K * V
    workers = num_workers() if flops >= tuning.LOOP_MIN_FLOPS else 1
    # Several parts per thread: a thread slowed by another process holds back less.
    parts = split(lanes, min(lanes, workers * tuning.PARTS_PER_THREAD))
    with single_threaded_blas():  # the products are small: one BLAS thread in each of dplr's
        run_all(lambda s: _chunked_lanes(*args, s.start, s.stop), parts)
    if torch:
        import torch as _torch

        return _torch.from_numpy(out), _torch.from_numpy(state)
    return out, state


@jit(nogil=True)
def prefetch_inputs(q, k, v, beta, g, b, hk, h, t0, t1):
    """Prefetch the rows of tokens t0:t1 of key head hk and value head h in q, k, v, beta, g."""
    prefetch_rows(q[b, t0:t1, hk], 0, q.shape[3])
    prefetch_rows(k[b, t0:t1, hk], 0, k.shape[3])
    prefetch_rows(v[b, t0:t1, h], 0, v.shape[3])
    prefetch_entries(beta[b, t0:t1, h])
    prefetch_rows(g[b, t0:t1, h], 0, g.shape[3])


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunked_lanes(q, k, v, beta, g, s0, has_s0, state, out, batch, start, stop, scale,
                   l2norm, chunk, floor, budget, lane_start, lane_stop):  # fmt: skip
    """Lanes ``lane_start:lane_stop`` (lane = sequence * HV + value head), chunk by chunk.

    q, k: (B, T, H, K); v, out: (B, T, HV, V); beta: (B, T, HV); g: (B, T, HV,
    E) with E = 0 (no decay), 1 (one per head) or K (per channel); s0, state:
    (N, HV, K, V); sequence n is ``batch[n], start[n]:stop[n]``.
    """
    H, K = q.shape[2], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    E = g.shape[3]
    group = HV // H
    s_vnew = np.empty((K + chunk, V), v.dtype)  # the state (K rows), then the chunk's v_new
    full = _buffers(chunk, K, V, E, v.dtype)
    scratch = gemm_scratch(v.dtype)
    for lane in range(lane_start, lane_stop):
        n, h = lane // HV, lane % HV
        b, hk = batch[n], h // group
        if has_s0:
            s_vnew[:K] = s0[n, h]
        else:
            s_vnew[:K] = 0
        t0 = start[n]
        while t0 < stop[n]:
            L = min(chunk, stop[n] - t0)
            buf = full if L == chunk else _buffers(L, K, V, E, v.dtype)
            _load_chunk(q, k, v, beta, g, b, hk, h, t0, scale, l2norm, floor, budget, buf)
            if E > 1:
                _channel_blocks(buf, floor, budget)
            else:
                _row_blocks(buf, floor)
            if t0 + L < stop[n]:  # the next chunk's rows, one page each
                t1 = min(t0 + L + chunk, stop[n])
                prefetch_inputs(q, k, v, beta, g, b, hk, h, t0 + L, t1)
            _chunk_step(buf, s_vnew, out, b, h, t0, scratch)
            t0 += L
        state[n, h] = s_vnew[:K]
    stream_fence()


@jit(nogil=True)
def _buffers(L, K, V, E, dtype):
    """Scratch arrays for a chunk of L tokens (all in cache for L = 32..64, K = V = 128)."""
    e = max(E, 1)
    # [q ⊙ w_in | P]: one product with the stacked [Z; U] gives the outputs.  The
    # blocks never write above P's diagonal, so those entries stay 0.
    qp = np.zeros((L, K + L), dtype)
    return (
        np.empty((L, K), dtype),  # kb ⊙ w_in (reads the state)
        np.empty((L, K), dtype),  # kb = beta k
        np.empty((L, K), dtype),  # q (scaled, normalised)
        np.empty((L, K), dtype),  # k (normalised)
        np.empty((L, K), dtype),  # k ⊙ w_out (writes the state)
        np.empty((L, L), dtype),  # I + A
        qp[:, K:],  # P
        np.empty((L, V), dtype),  # beta v, then the right-hand side
        qp,
        np.empty((L, e), dtype),  # cumulative finite log decay from the chunk start
        np.empty((L, e), np.int64),  # resets (g = -inf) from the chunk start
        np.empty((4 * L, K), dtype),  # factors and anchored rows (per-channel decay)
        np.empty(K, dtype),  # a, the state's decay across the chunk (per channel)
    )


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _load_chunk(q, k, v, beta, g, b, hk, h, t0, scale, l2norm, floor, budget, buf):
    """Read tokens t0:t0+L of one head into the chunk buffers, with the decay factors."""
    kb_in, kb, qs, kn, k_out, _, _, rhs, qp, gc, rc, rows, a = buf
    L, K = kb.shape
    V = rhs.shape[1]
    E = g.shape[3]
    dt = kb.dtype.type
    tiny = np.finfo(kb.dtype).tiny
    for i in range(L):
        t = t0 + i
        qi, ki = q[b, t, hk], k[b, t, hk]
        qn = kn_ = dt(1)
        if l2norm:
            sq = sk = dt(0)
            for p in range(K):
                sq += qi[p] * qi[p]
                sk += ki[p] * ki[p]
            qn = dt(1) / np.sqrt(max(sq, tiny))
            kn_ = dt(1) / np.sqrt(max(sk, tiny))
        bt = beta[b, t, h]
        qn *= scale
        for p in range(K):
            kv = ki[p] * kn_
            kn[i, p] = kv
            kb[i, p] = bt * kv
            qs[i, p] = qi[p] * qn
        vi = v[b, t, h]
        for s in range(V):
            rhs[i, s] = bt * vi[s]
    # Cumulative decay from the chunk start: finite part and count of resets.
    for e in range(gc.shape[1]):
        acc, resets = dt(0), 0
        for i in range(L):
            gi = g[b, t0 + i, h, e] if E > 0 else dt(0)
            if gi == -np.inf:
                resets += 1
            else:
                acc += gi
            gc[i, e], rc[i, e] = acc, resets
    # Factors from the chunk start: exp(x) for x <= 0, exactly 0 across a reset
    # or below the flush threshold (as dplr.core._decay.exp_at_most_one).
    e_count = gc.shape[1]
    w_in, w_out = rows[:L, :e_count], rows[L : 2 * L, :e_count]
    if e_count == 1:  # one exponential per row
        g_last, r_last = gc[L - 1, 0], rc[L - 1, 0]
        a[0] = _factor(g_last, r_last == 0, floor)
        for i in range(L):
            w_in[i, 0] = _factor(gc[i, 0], rc[i, 0] == 0, floor)
            w_out[i, 0] = _factor(g_last - gc[i, 0], rc[i, 0] == r_last, floor)
    else:  # per channel: one exponential per token and channel, then running products
        _channel_factors(g, b, h, t0, floor, budget, rows[3 * L :], w_in, w_out, a)
    for i in range(L):
        if e_count == 1:
            wi, wo = w_in[i, 0], w_out[i, 0]
            for p in range(K):
                kb_in[i, p] = wi * kb[i, p]
                qp[i, p] = wi * qs[i, p]
                k_out[i, p] = wo * kn[i, p]
        else:
            for p in range(K):
                kb_in[i, p] = w_in[i, p] * kb[i, p]
                qp[i, p] = w_in[i, p] * qs[i, p]
                k_out[i, p] = w_out[i, p] * kn[i, p]


@jit(nogil=True, fastmath={"contract"})
def _channel_factors(g, b, h, t0, floor, budget, fac, w_in, w_out, a):
    """Per-channel decay factors of a chunk by running products of ``a_t = exp(g_t)``.

    ``fac[i] = exp(g_i)``, ``w_in[i] = prod_{t <= i} a_t = exp(G_i)``,
    ``w_out[i] = prod_{t > i} a_t = exp(G_last - G_i)``, ``a = w_in[last]``
    (chunk-relative, as in :func:`dplr.core._decay.rel_exp`): L K
    exponentials instead of 3 L K.  A ``-inf`` entry is a factor of exactly
    0, so a product across a reset is exactly 0; products below
    ``exp(-floor)`` are set to 0 (the flush of :func:`_factor`).  A product
    of L rounded factors has a relative error of at most about L eps.
    """
    L, K = fac.shape
    dt = fac.dtype.type
    tiny = dt(np.exp(-floor))
    # Kept down to e^-budget: a sub-block of two or more rows divides by
    # products of these (:func:`_channel_blocks`), all normal numbers then.
    _exp_rows(g[b, t0 : t0 + L, h], fac, budget)
    for p in range(K):
        a[p] = dt(1)
    for i in range(L):
        for p in range(K):
            run = a[p] * fac[i, p]
            run = run if run >= tiny else dt(0)
            a[p] = run
            w_in[i, p] = run
    for p in range(K):
        w_out[L - 1, p] = dt(1)
    for i in range(L - 2, -1, -1):
        for p in range(K):
            run = w_out[i + 1, p] * fac[i + 1, p]
            w_out[i, p] = run if run >= tiny else dt(0)


@jit(nogil=True, fastmath={"contract"})
def _exp_rows(x, out, budget):
    """``out = exp(x)`` where ``-budget <= x <= 0``, else 0; x, out (L, K).

    Written so that the compiler vectorises it (Numba's ``np.exp`` is a
    scalar call here: 4096 of them took 29 us per chunk of 32 x 128, this
    5 us): ``x = m ln 2 + r`` with ``m = round(x / ln 2)`` and ``|r| <= ln(2) / 2``
    (Cody and Waite's two-part ln 2, whose high part times m is exact), the
    Taylor polynomial of ``exp(r)`` to degree 7 (float32) or 13 (float64),
    whose remainder is below 1e-8 and 1e-17 relative, and ``2^m`` from the
    exponent bits (:func:`_pow2`).  Within about 1 eps of ``exp``: measured
    0.6 eps (float32) and 1.0 eps (float64) over [-budget, 0].  The budgets
    (80 and 600) keep ``2^m`` a normal number.
    """
    L, K = out.shape
    dt = out.dtype.type
    single = out.itemsize == 4
    log2e = dt(1.4426950408889634)
    ln2_hi = dt(0.693359375) if single else dt(6.93147180369123816490e-01)
    ln2_lo = dt(-2.12194440e-4) if single else dt(1.90821492927058770002e-10)
    half = dt(0.5)
    xi, powers = np.empty(K, out.dtype), np.empty(K, out.dtype)
    cells32, cells64 = np.empty(K, np.int32), np.empty(K, np.int64)
    for i in range(L):
        xi[:] = x[i]  # contiguous: a strided row does not vectorise
        oi = out[i]
        for p in range(K):
            xp = max(xi[p], -budget)
            m = np.floor(xp * log2e + half)
            r = (xp - m * ln2_hi) - m * ln2_lo
            y = dt(1 / 5040) if single else dt(1 / 6227020800)
            if not single:
                y = y * r + dt(1 / 479001600)
                y = y * r + dt(1 / 39916800)
                y = y * r + dt(1 / 3628800)
                y = y * r + dt(1 / 362880)
                y = y * r + dt(1 / 40320)
                y = y * r + dt(1 / 5040)
            y = y * r + dt(1 / 720)
            y = y * r + dt(1 / 120)
            y = y * r + dt(1 / 24)
            y = y * r + dt(1 / 6)
            y = y * r + half
            y = y * r + dt(1)
            oi[p] = y * r + dt(1)
            powers[p] = m
        _pow2(powers, cells32, cells64)
        for p in range(K):
            oi[p] = oi[p] * powers[p] if xi[p] >= -budget else dt(0)


@jit(nogil=True)
def _pow2(m, cells32, cells64):
    """``m <- 2^m`` in place for integer-valued m in the dtype's normal exponent range."""
    n = m.shape[0]
    if m.itemsize == 4:
        for p in range(n):
            cells32[p] = (np.int32(m[p]) + 127) << 23
        f32 = cells32.view(np.float32)
        for p in range(n):
            m[p] = f32[p]
    else:
        for p in range(n):
            cells64[p] = (np.int64(m[p]) + 1023) << 52
        f64 = cells64.view(np.float64)
        for p in range(n):
            m[p] = f64[p]


@jit(nogil=True)
def _row_steps(buf, floor):
    """The per-token factors ``a_t = exp(g_t)`` (t >= 1) of one decay per row, in
    ``rows[2L:3L, 0]`` (free with one decay), returned; empty when K = 0."""
    _, _, _, kn, _, _, _, _, _, gc, rc, rows, _ = buf
    L, K = kn.shape
    step = rows[2 * L : 3 * L, 0] if K > 0 else rows[:0, 0]
    for t in range(1, L if K > 0 else 0):  # K = 0: the products are empty sums, 0
        step[t] = _factor(gc[t, 0] - gc[t - 1, 0], rc[t, 0] == rc[t - 1, 0], floor)
    return step


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _row_blocks(buf, floor):
    """``I + A`` and ``P`` with one decay per row: products masked by ``D_ij = exp(g_i - g_j)``.

    ``D_ij = prod_{j < t <= i} a_t`` with ``a_t = exp(g_t)``, formed right to
    left along each row: L exponentials per chunk instead of L^2 / 2 (the
    exponentials took three quarters of this function at L = 32).  A
    product of at most L rounded factors has a relative error of at most
    about L eps; a reset (``g = -inf``) is an exact zero factor, and a
    product below ``exp(-floor)`` is set to 0 as :func:`_factor` does.
    """
    _, kb, qs, kn, _, a_blk, p_blk, _, _, _, _, _, _ = buf
    L, K = kn.shape
    dt = kn.dtype.type
    tiny = dt(np.exp(-floor))
    _strict_lower_product(kb, kn, a_blk)
    _strict_lower_product(qs, kn, p_blk)
    step = _row_steps(buf, floor)
    for i in range(L):
        d_ij = dt(1)
        for j in range(i - 1 if K > 0 else -1, -1, -1):
            d_ij *= step[j + 1]
            d_ij = d_ij if d_ij >= tiny else dt(0)
            a_blk[i, j] *= d_ij
            p_blk[i, j] *= d_ij
        a_blk[i, i] = dt(1)
        diag = dt(0)
        for p in range(K):
            diag += qs[i, p] * kn[i, p]
        p_blk[i, i] = diag
        for j in range(i + 1, L):  # the strict lower product writes a few entries above
            p_blk[i, j] = dt(0)


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _channel_blocks(buf, floor, budget):
    """``I + A`` and ``P`` with one decay per key channel, anchored per sub-block.

    ``A_ij = sum_c kb_ic k_jc exp(G_ic - G_jc)`` (P with q for kb) as in
    :func:`dplr.core._decay.channel_strict_blocks` (docs/algorithms.md,
    section 10): for sub-blocks of ``sub`` rows over which no exponent
    exceeds ``budget``, the diagonal sub-block (rows ``start:stop``) is
    anchored at its first row s, ``(x_i exp(G_i - G_s)) . (k_j exp(G_s - G_j))``,
    and the rows below at its last row a, ``(x_i exp(G_i - G_a)) . (k_j exp(G_a - G_j))`` (both
    factors <= 1, resets exact).  A diagonal sub-block with a reset after its
    first row is formed pair by pair.  The sub-block length is chosen per
    chunk from the steepest decay inside it.
    """
    _, kb, qs, kn, _, a_blk, p_blk, _, _, gc, rc, rows, _ = buf
    L, K = kn.shape
    dt = kn.dtype.type
    tiny = dt(np.exp(-floor))
    sub = sub_block_rows(gc, budget)
    xa, xp, ky, fac = rows[:L], rows[L : 2 * L], rows[2 * L : 3 * L], rows[3 * L :]
    for i in range(L):
        a_blk[i, i] = dt(1)
        diag = dt(0)
        for p in range(K):
            diag += qs[i, p] * kn[i, p]
        p_blk[i, i] = diag
    for start in range(0, L, sub):
        stop = min(start + sub, L)
        reset_inside = False
        for p in range(K):
            reset_inside = reset_inside or rc[stop - 1, p] != rc[start, p]
        if reset_inside:  # pair by pair, the factor of each pair tested
            for i in range(start + 1, stop):
                for j in range(start, i):
                    sa = sp = dt(0)
                    for p in range(K):
                        f = _factor(gc[i, p] - gc[j, p], rc[i, p] == rc[j, p], floor) * kn[j, p]
                        sa += kb[i, p] * f
                        sp += qs[i, p] * f
                    a_blk[i, j], p_blk[i, j] = sa, sp
        else:
            anchored_rows(kb, qs, kn, fac, start, stop, ky, xa, xp, ky)  # ky holds wq first
            for i in range(start + 1, stop):
                _anchored_row(xa, xp, ky, a_blk, p_blk, i, start, i)
        if stop == L:
            continue
        # Rows below, anchored at row a = stop - 1: prod_{a < t <= i} a_t and prod_{j < t <= a} a_t.
        for p in range(K):
            xa[stop - 1, p] = dt(1)  # running products, in rows of xa not read below
            xp[stop - 1, p] = dt(1)
        for i in range(stop, L):
            for p in range(K):
                run = xa[i - 1, p] * fac[i, p] if i > stop else fac[i, p]
                run = run if run >= tiny else dt(0)
                xa[i, p] = run
        for i in range(stop, L):
            for p in range(K):
                wq = xa[i, p]
                xa[i, p], xp[i, p] = kb[i, p] * wq, qs[i, p] * wq
        for p in range(K):
            ky[stop - 1, p] = dt(1)
        for j in range(stop - 2, start - 1, -1):
            for p in range(K):
                run = ky[j + 1, p] * fac[j + 1, p]
                ky[j, p] = run if run >= tiny else dt(0)
        for j in range(start, stop):
            for p in range(K):
                ky[j, p] = kn[j, p] * ky[j, p]
        for i in range(stop, L):
            _anchored_row(xa, xp, ky, a_blk, p_blk, i, start, stop)


@jit(nogil=True, fastmath={"contract", "reassoc"})
def anchored_rows(kb, qs, kn, fac, start, stop, wq, xa, xp, ky):
    """Rows ``start:stop`` anchored at row ``start``: ``wq_i = exp(G_i - G_start) =
    prod_{start < t <= i} fac_t`` (>= e^-budget within a sub-block), ``xa = kb ⊙ wq``,
    ``xp = qs ⊙ wq``, ``ky = kn / wq``, all written.  ``wq`` may be ``ky`` itself
    (each weight is read before its entry of ky is written)."""
    K = kn.shape[1]
    for p in range(K):
        wq[start, p] = wq.dtype.type(1)
    for i in range(start + 1, stop):
        for p in range(K):
            wq[i, p] = wq[i - 1, p] * fac[i, p]
    for i in range(start, stop):
        for p in range(K):
            w = wq[i, p]
            xa[i, p], xp[i, p], ky[i, p] = kb[i, p] * w, qs[i, p] * w, kn[i, p] / w


@jit(nogil=True)
def sub_block_rows(gc, budget):
    """Rows per sub-block of a chunk with per-channel cumulative log decays gc (L, K):
    L if no exponent across the chunk exceeds ``budget``, else the largest power
    of two over which the steepest one-token decay stays within it (at least 1)."""
    L, K = gc.shape
    steepest = gc.dtype.type(0)
    for i in range(1, L):
        for p in range(K):
            steepest = max(steepest, gc[i - 1, p] - gc[i, p])
    sub = L
    if (L - 1) * steepest > budget:
        sub = 1
        while sub * 2 <= L and (sub * 2 - 1) * steepest <= budget:
            sub *= 2
    return sub


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _anchored_row(xa, xp, ky, a_blk, p_blk, i, j0, j1):
    """Row i, columns j0:j1 of both blocks from anchored factors: ``A_ij = xa_i . ky_j``
    and ``P_ij = xp_i . ky_j`` (the anchor's weights already folded into xa, xp, ky)."""
    for j in range(j0, j1):
        sa = sp = a_blk.dtype.type(0)
        for p in range(xa.shape[1]):
            sa += xa[i, p] * ky[j, p]
            sp += xp[i, p] * ky[j, p]
        a_blk[i, j], p_blk[i, j] = sa, sp


@jit(nogil=True)
def _factor(x, keep, floor):
    """``exp(x)`` for ``-floor <= x <= 0`` where ``keep``, else exactly 0."""
    if keep and x >= -floor:
        return np.exp(min(x, x * 0))
    return x * 0


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _chunk_step(buf, s_vnew, out, b, h, t0, scratch):
    """One chunk: v_new, the outputs (written to ``out[b, t0:t0+L, h]``) and the next state.

    ``s_vnew`` (K + chunk, V) holds the state S entering the chunk in its
    first K rows; the chunk's new values are written below it, so that one
    product ``[q ⊙ w_in | P] [S; v_new]`` gives the outputs.  The three
    products are BLAS calls (:func:`~dplr._runtime.gemm.gemm`).
    """
    kb_in, _, _, _, k_out, a_blk, _, rhs, qp, gc, _, _, a = buf
    L, K = kb_in.shape
    s, v_new = s_vnew[:K], s_vnew[K : K + L]
    gemm(kb_in, s, rhs, -1.0, 1.0, False, scratch)  # beta v - (kb ⊙ w_in) S
    _forward_substitute(a_blk, rhs, v_new)
    # The outputs into the right-hand side's rows (free after the substitution), then
    # to the output's rows by streaming stores (no read for ownership).
    gemm(qp, s_vnew[: K + L], rhs, 1.0, 0.0, False, scratch)
    stream_rows(out[b, t0 : t0 + L, h], rhs)
    if gc.shape[1] == 1:  # one decay: S <- a S + (k ⊙ w_out)^T v_new
        gemm(k_out, v_new, s, 1.0, a[0], True, scratch)
    else:  # per channel: row p of S decays by a_p
        for p in range(K):
            ap = a[p]
            for col in range(s.shape[1]):
                s[p, col] *= ap
        gemm(k_out, v_new, s, 1.0, 1.0, True, scratch)
