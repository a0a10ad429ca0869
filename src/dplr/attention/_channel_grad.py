"""The per-key-channel (KDA) parts of the compiled backward of :mod:`dplr.attention._chunked_grad`.

With one decay per key channel the chunk's factors ``w_in``, ``w_out`` and
the state's decay ``a`` are vectors per row, and the blocks
``A_ij = sum_c kb_ic k_jc exp(G_ic - G_jc)`` (P alike with q) are formed from
rows rescaled to an anchor row per sub-block
(:func:`dplr.attention._chunked._channel_blocks`, ``docs/kda.md``).  The
pull-back here runs on the same sub-blocks, so no exponential is formed that
the forward did not form, and its products are BLAS calls.
"""

from __future__ import annotations

import numpy as np

from .._runtime.gemm import gemm
from .._runtime.jit import jit
from ._chunked import _factor, anchored_rows, sub_block_rows


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _channel_factors_back(kb_in, q_in, k_out, wio, dkq, dk_out, dkb, dqs, dkn, dgam):
    """Per key channel: ``x ⊙ w_in`` and ``k ⊙ w_out`` back to dkb, dq, dk and dG (written)."""
    L, K = dkb.shape
    w_in, w_out = wio[:L], wio[L : 2 * L]
    for i in range(L):
        for p in range(K):
            dkb[i, p] = w_in[i, p] * dkq[i, p]
            dqs[i, p] = w_in[i, p] * dkq[L + i, p]
            dkn[i, p] = w_out[i, p] * dk_out[i, p]
            s_out = k_out[i, p] * dk_out[i, p]
            dgam[i, p] += kb_in[i, p] * dkq[i, p] + q_in[i, p] * dkq[L + i, p] - s_out
            dgam[L - 1, p] += s_out


@jit(nogil=True, fastmath={"contract", "reassoc"})
def _channel_blocks_back(kb, qs, kn, gc, rc, rows, e_a, e_p, dkb, dqs, dkn, dgam, work, floor,
                         budget, scratch):  # fmt: skip
    """The blocks' pull-back per key channel, on the anchored sub-blocks of the forward.

    ``A_ij = sum_c kb_ic k_jc exp(G_ic - G_jc)`` (P alike with q) is formed in
    :func:`dplr.attention._chunked._channel_blocks` as ``xa_i . ky_j`` with
    rows rescaled to an anchor row a: ``xa_i = kb_i ⊙ exp(G_i - G_a)``,
    ``ky_j = k_j ⊙ exp(G_a - G_j)``.  Given ``E_A = dA`` (strict lower) and
    ``E_P = dP`` (lower): ``dxa = E_A ky``, ``dky = E_A^T xa + E_P^T xp``,
    back through the weights, and ``dG_i += xa_i ⊙ dxa_i + xp_i ⊙ dxp_i -
    ky_i ⊙ dky_i`` (the anchor's shares cancel: ``sum_i xa ⊙ dxa = sum_j
    ky ⊙ dky``).  The sub-blocks are chosen as in the forward; a diagonal
    sub-block with a reset inside is pulled back pair by pair.
    """
    L, K = kn.shape
    dt = kn.dtype.type
    tiny = dt(np.exp(-floor))
    fac = rows[3 * L :]
    xa, xp, ky = rows[:L], rows[L : 2 * L], rows[2 * L : 3 * L]
    wq, dxa, dxp, dky = work[:L], work[L : 2 * L], work[2 * L : 3 * L], work[3 * L :]
    # The diagonal P_ii = q_i . k_i (no decay; its dG shares cancel).
    for i in range(L):
        d = e_p[i, i]
        for p in range(K):
            dqs[i, p] += d * kn[i, p]
            dkn[i, p] += d * qs[i, p]
        e_p[i, i] = dt(0)
    sub = sub_block_rows(gc, budget)
    for start in range(0, L, sub):
        stop = min(start + sub, L)
        reset_inside = False
        for p in range(K):
            reset_inside = reset_inside or rc[stop - 1, p] != rc[start, p]
        if reset_inside:
            for i in range(start + 1, stop):
                for j in range(start, i):
                    ea, ep = e_a[i, j], e_p[i, j]
                    for p in range(K):
                        f = _factor(gc[i, p] - gc[j, p], rc[i, p] == rc[j, p], floor)
                        x = ea * kb[i, p] + ep * qs[i, p]
                        dkb[i, p] += ea * f * kn[j, p]
                        dqs[i, p] += ep * f * kn[j, p]
                        dkn[j, p] += x * f
                        share = x * f * kn[j, p]
                        dgam[i, p] += share
                        dgam[j, p] -= share
        elif stop - start > 1:  # anchored at row start: wq_i = exp(G_i - G_start)
            anchored_rows(kb, qs, kn, fac, start, stop, wq, xa, xp, ky)
            _anchored_back(e_a, e_p, xa, xp, ky, dxa, dxp, dky, start, stop, start, stop,
                           scratch)  # fmt: skip
            for i in range(start, stop):
                for p in range(K):
                    w = wq[i, p]
                    dkb[i, p] += w * dxa[i, p]
                    dqs[i, p] += w * dxp[i, p]
                    dkn[i, p] += dky[i, p] / w
                    dgam[i, p] += xa[i, p] * dxa[i, p] + xp[i, p] * dxp[i, p] - ky[i, p] * dky[i, p]
        if stop == L:
            continue
        # Rows below, anchored at row stop - 1 (as in the forward, products flushed below tiny).
        for i in range(stop, L):
            for p in range(K):
                run = wq[i - 1, p] * fac[i, p] if i > stop else fac[i, p]
                wq[i, p] = run if run >= tiny else dt(0)
        for i in range(stop, L):
            for p in range(K):
                xa[i, p], xp[i, p] = kb[i, p] * wq[i, p], qs[i, p] * wq[i, p]
        for p in range(K):
            dxa[stop - 1, p] = dt(1)  # the column weights, held in rows of dxa not used below
        for j in range(stop - 2, start - 1, -1):
            for p in range(K):
                run = dxa[j + 1, p] * fac[j + 1, p]
                dxa[j, p] = run if run >= tiny else dt(0)
        for j in range(start, stop):
            for p in range(K):
                wq[j, p] = dxa[j, p]
                ky[j, p] = kn[j, p] * dxa[j, p]
        _anchored_back(e_a, e_p, xa, xp, ky, dxa, dxp, dky, stop, L, start, stop, scratch)
        for i in range(stop, L):
            for p in range(K):
                w = wq[i, p]
                dkb[i, p] += w * dxa[i, p]
                dqs[i, p] += w * dxp[i, p]
                dgam[i, p] += xa[i, p] * dxa[i, p] + xp[i, p] * dxp[i, p]
        for j in range(start, stop):
            for p in range(K):
                dkn[j, p] += wq[j, p] * dky[j, p]
                dgam[j, p] -= ky[j, p] * dky[j, p]


@jit(nogil=True)
def _anchored_back(e_a, e_p, xa, xp, ky, dxa, dxp, dky, r0, r1, c0, c1, scratch):
    """Rows r0:r1, columns c0:c1 of ``A = xa ky^T``, ``P = xp ky^T``: ``dxa = E_A ky``,
    ``dxp = E_P ky`` (rows r0:r1) and ``dky = E_A^T xa + E_P^T xp`` (rows c0:c1), written."""
    ea, ep = e_a[r0:r1, c0:c1], e_p[r0:r1, c0:c1]
    gemm(ea, ky[c0:c1], dxa[r0:r1], 1.0, 0.0, False, scratch)
    gemm(ep, ky[c0:c1], dxp[r0:r1], 1.0, 0.0, False, scratch)
    gemm(ea, xa[r0:r1], dky[c0:c1], 1.0, 0.0, True, scratch)
    gemm(ep, xp[r0:r1], dky[c0:c1], 1.0, 1.0, True, scratch)
