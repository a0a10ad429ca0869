"""Cumulative log decay with exact resets, and the per-channel diagonal blocks.

A log decay entry may be ``-inf`` (a decay factor of exactly 0: a reset).
``G = cumsum(log_decay)`` would then hold ``-inf`` and ``G_i - G_j`` would be
``-inf - -inf = NaN``.  Instead the decay is kept as two cumulative sums:
``g``, of the finite entries only, and ``r``, the number of resets so far.
The factor between rows j <= i is

    exp(g_i - g_j)   if r_i == r_j   (no reset in (j, i]),   else 0,

computed by :func:`rel_exp` with the test applied to the exponent, so it is
exact, finite, and never NaN.  ``r`` is None when there is no reset.

Per-channel decay (``log_decay`` of shape (..., n, d)) makes the strict lower
part ``T_ij = sum_c q_ic k_jc exp(G_ic - G_jc)``, no longer a mask on
``q k^T``.  :func:`channel_strict_blocks` forms the diagonal c x c blocks of
T as products of rescaled factors, anchored per sub-block of ``sub`` rows so
that every exponent stays inside the dtype's range (docs/algorithms.md,
section 10), and :func:`channel_pull_blocks` is its adjoint (the part of
``dq`` inside the chunks).  Shapes: chunked factors (..., nc, c, d); chunked
decay ``g``, ``r`` (..., nc, c, e) with e = 1 (one decay per row) or d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._runtime.backend import Array

#: The largest exponent a sub-block may span, by dtype: e^80 and e^-80 are
#: normal float32 numbers (float32 ends near e^88 and e^-87), e^600 leaves
#: float64 (e^709) room for factors up to 1e48.
_EXPONENT_BUDGET = {4: 80.0, 8: 600.0}

#: Factors ``exp(x) <= 1`` below ``exp(-floor)`` are set to exactly 0, by
#: dtype: products of two kept factors stay normal numbers (float32 below
#: e^-87 is subnormal, and arithmetic on subnormals ran the float32 solve at
#: decay -5 per row 6-10x slower), and a dropped factor changes a term by less
#: than e^-40 (float32) or e^-300 (float64) of |q||k|, far below the rounding.
_FLUSH_BELOW = {4: 40.0, 8: 300.0}

#: Flagged sub-blocks (those with a reset inside) are formed pair by pair in
#: groups of at most this many elements of the (group, L, L, d) factor tensor.
_PAIRWISE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ChunkDecay:
    """Cumulative decay inside each chunk, from the row before the chunk.

    ``g`` (..., nc, c, e): sum of the finite log decays of the chunk up to and
    including each row; ``r``: the number of resets (``-inf``) among them, or
    None when the whole sequence has none; ``sub``: rows per sub-block for
    the per-channel blocks (see :func:`sub_block_length`).
    """

    g: Array
    r: Array | None
    sub: int


def split_resets(ops, log_decay: Array) -> tuple[Array, Array | None]:
    """``(finite part, 1.0 where -inf else 0.0)``; the second is None without resets."""
    reset = log_decay == -math.inf
    if not bool(reset.any()):
        return log_decay, None
    zero = ops.zeros(log_decay.shape, log_decay)
    return ops.where(reset, zero, log_decay), ops.where(reset, zero + 1.0, zero)


def exp_at_most_one(ops, expo: Array, keep: Array | None = None) -> Array:
    """``exp(expo)`` for ``expo <= 0`` where ``keep`` holds, else exactly 0.

    Factors below ``exp(-_FLUSH_BELOW)`` of the dtype are exactly 0 as well.
    The exponent is clipped to [-floor, 0] before ``exp`` and the zeros are
    put in afterwards: ``exp`` of ``-inf`` (float64) or of arguments whose
    result is subnormal (float32) runs 10-20x slower than of ordinary ones.
    ``expo`` may hold NaN or positive values where ``keep`` is False.
    """
    floor = _FLUSH_BELOW.get(expo.dtype.itemsize, _FLUSH_BELOW[4])
    inside = expo >= -floor  # False for NaN
    keep = inside if keep is None else keep & inside
    return ops.where(keep, ops.exp(expo.clip(-floor, 0.0)), 0.0)


def rel_exp(ops, g_to: Array, r_to: Array | None, g_from: Array, r_from: Array | None) -> Array:
    """``exp(g_to - g_from)`` (<= 1) where no reset lies between, else exactly 0 (broadcasting).

    Factors below ``exp(-_FLUSH_BELOW)`` of the dtype are exactly 0 as well.
    """
    same = None if r_to is None else r_to == r_from
    return exp_at_most_one(ops, g_to - g_from, same)


def global_weights(ops, log_decay: Array, axis: int) -> tuple[Array, Array]:
    """``exp(G)`` and ``exp(G[last] - G)`` along ``axis`` (both <= 1), resets exact."""
    finite, reset = split_resets(ops, log_decay)
    g = finite.cumsum(axis)
    r = None if reset is None else reset.cumsum(axis)
    last = [slice(None)] * g.ndim
    last[axis] = slice(-1, None)
    last = tuple(last)
    zero = 0.0 * g
    e_g = rel_exp(ops, g, r, zero, None if r is None else zero)
    e_tail = rel_exp(ops, g[last], None if r is None else r[last], g, r)
    return e_g, e_tail


def sub_block_length(finite: Array, c: int, itemsize: int) -> int:
    """Rows per sub-block: the largest power of two <= c over which no decay exceeds the budget.

    Inside a sub-block of L rows the exponents span at most (L - 1) times the
    steepest finite log decay per row (float32 at -5 per row: 16 rows).
    """
    if math.prod(finite.shape) == 0:
        return c
    steepest = max(0.0, float(-finite.min()))
    budget = _EXPONENT_BUDGET.get(itemsize, _EXPONENT_BUDGET[4])
    length = 1
    while length * 2 <= c and (length * 2 - 1) * steepest <= budget:
        length *= 2
    return c if (c - 1) * steepest <= budget else length


def cumsum_rows(x: Array) -> Array:
    """``x.cumsum(-2)``: NumPy's cumsum along a short middle axis is 2-4x slower
    than adding row by row into one array."""
    if not isinstance(x, np.ndarray):
        return x.cumsum(-2)
    out = np.empty_like(x)
    out[..., :1, :] = x[..., :1, :]
    for i in range(1, x.shape[-2]):
        np.add(out[..., i - 1, :], x[..., i, :], out=out[..., i, :])
    return out


def chunk_decay(ops, log_decay: Array, c: int, chunk_rows) -> ChunkDecay:
    """Cut a log decay (..., n, e) into chunks of c rows and accumulate inside each."""
    finite, reset = split_resets(ops, log_decay)
    g = cumsum_rows(chunk_rows(ops, finite, c))
    r = None if reset is None else cumsum_rows(chunk_rows(ops, reset, c))
    return ChunkDecay(g, r, sub_block_length(finite, c, finite.dtype.itemsize))


def _rows(x: Array | None, start: int, stop: int) -> Array | None:
    return None if x is None else x[..., start:stop, :]


def _sub_blocks(c: int, sub: int):
    """``(start, stop)`` row ranges of the sub-blocks of a chunk."""
    return [(start, min(start + sub, c)) for start in range(0, c, sub)]


def _anchored(ops, dec: ChunkDecay, start: int, stop: int):
    """Weights for the sub-block of rows start:stop (see :func:`channel_strict_blocks`).

    Returns ``(wq_in, wk_in, wq_below, wk_below)``: rows start:stop scaled by
    ``exp(g_i - g_s)`` (<= 1) and ``exp(g_s - g_j)`` (>= 1, at most e^budget),
    rows stop: by ``exp(g_i - g_a)`` and rows start:stop by ``exp(g_a - g_j)``
    with the anchor a = stop - 1 (both <= 1, resets exact); the last two are None for the
    last sub-block.
    """
    g, r = dec.g, dec.r
    g_s = g[..., start : start + 1, :]
    wq_in = ops.exp(g[..., start:stop, :] - g_s)
    wk_in = ops.exp(g_s - g[..., start:stop, :])
    if stop == g.shape[-2]:
        return wq_in, wk_in, None, None
    g_a, r_a = g[..., stop - 1 : stop, :], _rows(r, stop - 1, stop)
    wq_below = rel_exp(ops, g[..., stop:, :], _rows(r, stop, None), g_a, r_a)
    wk_below = rel_exp(ops, g_a, r_a, g[..., start:stop, :], _rows(r, start, stop))
    return wq_in, wk_in, wq_below, wk_below


def _flagged(ops, dec: ChunkDecay, start: int, stop: int) -> Array | None:
    """Flat indices of the chunks whose sub-block start:stop has a reset after its first row."""
    if dec.r is None or stop - start < 2:
        return None
    flag = (dec.r[..., stop - 1, :] != dec.r[..., start, :]).any(-1).reshape(-1)
    if not bool(flag.any()):
        return None
    return flag.nonzero()[0] if isinstance(flag, np.ndarray) else flag.nonzero()[:, 0]


def _pairwise_factors(ops, dec: ChunkDecay, idx: Array, start: int, stop: int) -> Array:
    """``exp(G_ic - G_jc)`` for i > j in rows start:stop of the chunks ``idx``, else 0.

    Returns (F, L, L, e): F chunks, L = stop - start rows, e channels.
    """
    g = dec.g.reshape(-1, *dec.g.shape[-2:])[idx, start:stop]
    r = dec.r.reshape(-1, *dec.r.shape[-2:])[idx, start:stop]
    strict = ops.strict_lower_mask(stop - start, g)[..., None]
    same = (r[:, :, None, :] == r[:, None, :, :]) & strict
    return exp_at_most_one(ops, g[:, :, None, :] - g[:, None, :, :], same)


def _groups(idx: Array, per_item: int):
    step = max(1, _PAIRWISE_ELEMENTS // max(per_item, 1))
    return [idx[i : i + step] for i in range(0, idx.shape[0], step)]


def channel_strict_blocks(ops, qc: Array, kc: Array, dec: ChunkDecay) -> Array:
    """``tril(T_JJ, -1)`` of every chunk for per-channel decay, (..., nc, c, c).

    For the sub-blocks I, J of ``dec.sub`` rows: below the diagonal
    (I after J) ``T_IJ = (Q_I exp(G_I - G_a)) (K_J exp(G_a - G_J))^T`` with
    a the last row of J, both factors <= 1; on the diagonal, anchored at the
    first row s = start of J, ``(Q_J exp(G_J - G_s)) (K_J exp(G_s - G_J))^T``, with
    exponents within the budget of :func:`sub_block_length`.  A diagonal
    sub-block with a reset inside is formed pair by pair instead.
    O(c^2 d) per chunk, and c d exponentials per sub-block.
    """
    c = qc.shape[-2]
    out = ops.zeros((*qc.shape[:-1], c), qc)
    for start, stop in _sub_blocks(c, dec.sub):
        wq_in, wk_in, wq_below, wk_below = _anchored(ops, dec, start, stop)
        block = (qc[..., start:stop, :] * wq_in) @ (kc[..., start:stop, :] * wk_in).mT
        out[..., start:stop, start:stop] = ops.where(
            ops.strict_lower_mask(stop - start, qc), block, 0.0
        )
        if wq_below is not None:
            out[..., stop:, start:stop] = (qc[..., stop:, :] * wq_below) @ (
                kc[..., start:stop, :] * wk_below
            ).mT
        idx = _flagged(ops, dec, start, stop)
        if idx is not None:
            flat_out = out.reshape(-1, c, c)
            qf, kf = qc.reshape(-1, c, qc.shape[-1]), kc.reshape(-1, c, kc.shape[-1])
            for part in _groups(idx, (stop - start) ** 2 * qc.shape[-1]):
                fac = _pairwise_factors(ops, dec, part, start, stop)
                prod = (
                    qf[part, start:stop][:, :, None, :] * fac * kf[part, start:stop][:, None, :, :]
                )
                flat_out[part, start:stop, start:stop] = prod.sum(-1)
    return out


def channel_pull_blocks(ops, a: Array, kc: Array, dec: ChunkDecay) -> Array:
    """``dq_ic = sum_{j<i in the chunk} a_ij k_jc exp(G_ic - G_jc)`` for every chunk.

    a: (..., nc, c, c), read below the diagonal only; kc: (..., nc, c, d).
    The adjoint of :func:`channel_strict_blocks` with respect to q (with the
    same anchoring): ``dq = sum over J of wq ⊙ (a[:, J] (K_J ⊙ wk))``.
    """
    c = kc.shape[-2]
    a = ops.where(ops.strict_lower_mask(c, a), a, 0.0)
    dq = ops.zeros(kc.shape, kc)
    for start, stop in _sub_blocks(c, dec.sub):
        wq_in, wk_in, wq_below, wk_below = _anchored(ops, dec, start, stop)
        inside = wq_in * (a[..., start:stop, start:stop] @ (kc[..., start:stop, :] * wk_in))
        idx = _flagged(ops, dec, start, stop)
        if idx is not None:
            flat = inside.reshape(-1, stop - start, kc.shape[-1])
            af, kf = a.reshape(-1, c, c), kc.reshape(-1, c, kc.shape[-1])
            for part in _groups(idx, (stop - start) ** 2 * kc.shape[-1]):
                fac = _pairwise_factors(ops, dec, part, start, stop)
                terms = (
                    af[part, start:stop, start:stop][..., None]
                    * fac
                    * kf[part, start:stop][:, None, :, :]
                )
                flat[part] = terms.sum(-2)
        dq[..., start:stop, :] = dq[..., start:stop, :] + inside
        if wq_below is not None:
            below = a[..., stop:, start:stop] @ (kc[..., start:stop, :] * wk_below)
            dq[..., stop:, :] = dq[..., stop:, :] + wq_below * below
    return dq


def channel_pull_blocks_pair(
    ops, a: Array, qc: Array, kc: Array, dec: ChunkDecay
) -> tuple[Array, Array]:
    """Both adjoints of :func:`channel_strict_blocks`, with its anchored weights formed once.

    ``dq_ic = sum_{j<i} a_ij k_jc exp(G_ic - G_jc)`` (as
    :func:`channel_pull_blocks`) and ``dk_jc = sum_{i>j} a_ij q_ic
    exp(G_ic - G_jc)``, inside every chunk.  a: (..., nc, c, c), read below
    the diagonal only; qc, kc: (..., nc, c, d).
    """
    c, d = kc.shape[-2], kc.shape[-1]
    a = ops.where(ops.strict_lower_mask(c, a), a, 0.0)
    dq, dk = ops.zeros(qc.shape, qc), ops.zeros(kc.shape, kc)
    for start, stop in _sub_blocks(c, dec.sub):
        wq_in, wk_in, wq_below, wk_below = _anchored(ops, dec, start, stop)
        a_in = a[..., start:stop, start:stop]
        inside_q = wq_in * (a_in @ (kc[..., start:stop, :] * wk_in))
        inside_k = wk_in * (a_in.mT @ (qc[..., start:stop, :] * wq_in))
        idx = _flagged(ops, dec, start, stop)
        if idx is not None:  # a reset inside the sub-block: pair by pair
            flat_q, flat_k = (
                inside_q.reshape(-1, stop - start, d),
                inside_k.reshape(-1, stop - start, d),
            )
            af = a.reshape(-1, c, c)
            qf, kf = qc.reshape(-1, c, d), kc.reshape(-1, c, d)
            for part in _groups(idx, (stop - start) ** 2 * d):
                weights = af[part, start:stop, start:stop][..., None] * _pairwise_factors(
                    ops, dec, part, start, stop
                )
                flat_q[part] = (weights * kf[part, start:stop][:, None, :, :]).sum(-2)
                flat_k[part] = (weights * qf[part, start:stop][:, :, None, :]).sum(-3)
        dq[..., start:stop, :] = dq[..., start:stop, :] + inside_q
        dk[..., start:stop, :] = dk[..., start:stop, :] + inside_k
        if wq_below is not None:
            a_below = a[..., stop:, start:stop]
            dq[..., stop:, :] = dq[..., stop:, :] + wq_below * (
                a_below @ (kc[..., start:stop, :] * wk_below)
            )
            dk[..., start:stop, :] = dk[..., start:stop, :] + wk_below * (
                a_below.mT @ (qc[..., stop:, :] * wq_below)
            )
    return dq, dk
