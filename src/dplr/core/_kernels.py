"""Chunked kernels for ``T = diag(lam) + tril(Q K^T ⊙ D, -1)``.

The derivations are in ``docs/algorithms.md`` (section 1).  All functions here
are pure, backend-neutral (NumPy or torch through ``ops``) and assume clean
input: same dtype, finite, batch dimensions already broadcast, so that

    q, k : (..., n, d)      lam : (..., n)      v : (..., n, m)      state h : (..., d, m)
    log_decay : (..., n) (one decay per row), (..., n, d) (per channel) or None

(:func:`matmul` and :func:`solve` also take ``lam=None``, a unit diagonal).

With one decay per row, ``T_ij = q_i . k_j exp(G_i - G_j)`` for i > j, with
``G = cumsum(log_decay)``; per channel, ``T_ij = sum_c q_ic k_jc exp(G_ic -
G_jc)``.  The state decays per channel in the same way (``Diag(a) h``).  A
``-inf`` entry is an exact reset (:mod:`dplr.core._decay`).  Decay factors
are only ever formed relative to the start of a chunk or to an anchor row
inside it, so no exponent overflows however long the sequence.

The chunking of T happens here and nowhere else in the library: the delta rule
calls these functions.  The Cholesky modifications have a block loop of their
own (``dplr.cholesky._blocked``): orthogonal reductions of a dense triangle,
not chunks of T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._runtime.backend import Array, Kernel, Ops
from .._runtime.tuning import CHUNK_ROWS as DEFAULT_CHUNK
from . import _jit, _rowwise
from ._decay import (
    ChunkDecay,
    channel_strict_blocks,
    chunk_decay,
    exp_at_most_one,
    rel_exp,
    split_resets,
)


@dataclass(frozen=True)
class Chunked:
    """Operands of T cut into ``nc`` chunks of ``c`` rows (zero-padded at the end).

    ``q_in`` and ``k_out`` carry the decay to and from the chunk boundaries:
    ``q_in[i] = q[i] exp(g[i])`` reads the state left by earlier chunks,
    ``k_out[j] = k[j] exp(g[c-1] - g[j])`` writes row j into the state passed on,
    and ``chunk_decay = exp(g[c-1])`` decays the state across a whole chunk.
    ``g`` is the cumulative log decay *within* each chunk.  With per-channel
    decay these weights are per channel (``chunk_decay`` (..., nc, d)),
    ``mask`` is None and ``decay`` holds what :func:`strict_blocks` needs.
    ``w_in`` and ``w_out`` are those decay weights themselves, (..., nc, c, e)
    with e = 1 (one decay per row) or d (per channel); None without decay.
    """

    q: Array  # (..., nc, c, d)
    k: Array  # (..., nc, c, d)
    lam: Array  # (..., nc, c)
    mask: Array | None  # (..., nc, c, c): D inside each chunk, zero on and above the diagonal
    q_in: Array  # (..., nc, c, d)
    k_out: Array  # (..., nc, c, d)
    chunk_decay: Array | None  # (..., nc) or per channel (..., nc, d); None without decay
    n: int
    c: int
    decay: ChunkDecay | None = None  # per-channel decay only
    w_in: Array | None = None  # exp(g), (..., nc, c, e)
    w_out: Array | None = None  # exp(g[c-1] - g), (..., nc, c, e)

    def state_decay(self, j: int) -> Array:
        """The factor of the state across chunk j, shaped to multiply a (..., d, m) state."""
        a = self.chunk_decay
        return a[..., j, :, None] if self.decay is not None else a[..., j, None, None]

    @property
    def nc(self) -> int:
        return self.q.shape[-3]


def chunk_rows(ops: Ops, x: Array, c: int, fill: float = 0.0) -> Array:
    """(..., n, r) -> (..., nc, c, r), padding the last chunk with ``fill``."""
    n = x.shape[-2]
    nc = -(-n // c)
    x = ops.pad_axis(x, -2, nc * c - n, fill)
    return x.reshape(*x.shape[:-2], nc, c, x.shape[-1])


def unchunk_rows(y: Array, n: int) -> Array:
    """(..., nc, c, r) -> (..., n, r), dropping the padding."""
    return y.reshape(*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1])[..., :n, :]


def effective_chunk(n: int, chunk_size: int | None) -> int:
    """The chunk size actually used: never more rows than the matrix has."""
    return max(1, min(chunk_size or DEFAULT_CHUNK, n))


def is_per_channel(q: Array, log_decay: Array | None) -> bool:
    """True for a (..., n, d) log decay (one per channel), False for (..., n) or None."""
    return log_decay is not None and log_decay.ndim == q.ndim


def make_chunked(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    chunk_size: int | None,
    *,
    decay_of: Chunked | None = None,
) -> Chunked:
    """Cut the operands of T into chunks and form the per-chunk quantities.

    The blocks ``T_JJ`` themselves are left to the caller: the solve forms
    them in compiled code, the others with :func:`strict_blocks`.
    ``log_decay`` is (..., n), (..., n, d) or None; ``-inf`` entries are
    exact resets.  ``decay_of``, the chunks of other operands with the same
    ``log_decay`` and chunk size, lends its decay weights and mask instead
    of forming them again (they depend on the decay only).
    """
    n = q.shape[-2]
    c = effective_chunk(n, chunk_size)
    qc, kc = chunk_rows(ops, q, c), chunk_rows(ops, k, c)
    lamc = chunk_rows(ops, lam[..., None], c, 1.0)[..., 0]
    if log_decay is None:
        return Chunked(qc, kc, lamc, None, qc, kc, None, n, c)
    weights = _decay_weights(ops, q, log_decay, c) if decay_of is None else decay_of
    return Chunked(
        q=qc,
        k=kc,
        lam=lamc,
        mask=weights.mask,
        q_in=qc * weights.w_in,
        k_out=kc * weights.w_out,
        chunk_decay=weights.chunk_decay,
        n=n,
        c=c,
        decay=weights.decay,
        w_in=weights.w_in,
        w_out=weights.w_out,
    )


def _decay_weights(ops: Ops, q: Array, log_decay: Array, c: int) -> Chunked:
    """The decay fields of :class:`Chunked` (the operand fields left None)."""
    channel = is_per_channel(q, log_decay)
    dec = chunk_decay(ops, log_decay if channel else log_decay[..., None], c, chunk_rows)
    g, r = dec.g, dec.r
    g_last, r_last = g[..., -1:, :], None if r is None else r[..., -1:, :]
    zero = 0.0 * g_last
    w_in = rel_exp(ops, g, r, zero, None if r is None else zero)
    w_out = rel_exp(ops, g_last, r_last, g, r)
    a = rel_exp(ops, g_last, r_last, zero, None if r is None else zero)[..., 0, :]
    mask = None
    if not channel:
        rr = None if r is None else r[..., 0]
        mask = decay_mask(ops, g[..., 0], ops.strict_lower_mask(c, q), rr)
    return Chunked(
        q=None,
        k=None,
        lam=None,
        mask=mask,
        q_in=None,
        k_out=None,
        chunk_decay=a if channel else a[..., 0],
        n=q.shape[-2],
        c=c,
        decay=dec if channel else None,
        w_in=w_in,
        w_out=w_out,
    )


def strict_blocks(ops: Ops, ch: Chunked) -> Array:
    """``tril(T_JJ, -1)`` for every chunk, (..., nc, c, c)."""
    if ch.decay is not None:
        return channel_strict_blocks(ops, ch.q, ch.k, ch.decay)
    blocks = ops.matmul(ch.q, ch.k.mT)
    return ops.keep_strict_lower(blocks) if ch.mask is None else ops.multiply_(blocks, ch.mask)


def decay_mask(ops: Ops, g: Array, strict: Array, resets: Array | None = None) -> Array:
    """``exp(g_i - g_j)`` where ``strict`` holds (i > j), else 0, for cumulative log decay g.

    The exponent is masked *before* ``exp``: above the diagonal ``g_i - g_j``
    is positive and could overflow.  g: (..., c) -> (..., c, c).  ``resets``
    (..., c), the running count of ``-inf`` entries left out of g, zeroes the
    pairs with a reset between them.
    """
    rel = g[..., :, None] - g[..., None, :]
    if resets is not None:
        strict = strict & (resets[..., :, None] == resets[..., None, :])
    return exp_at_most_one(ops, rel, strict)


def reversed_operands(
    ops: Ops, q: Array, k: Array, lam: Array | None, log_decay: Array | None
) -> tuple[Array, Array, Array | None, Array | None]:
    """Operands of ``P T^T P`` (P the reversal permutation), again lower triangular.

    ``(P T^T P)[i, j] = T[n-1-j, n-1-i]``: the roles of q and k swap, rows are
    reversed, and the decay between rows i-1 and i becomes ``log_decay[n-i]``
    (per channel alike).
    """
    rq, rk = ops.flip(k, -2), ops.flip(q, -2)
    rlam = None if lam is None else ops.flip(lam, -1)  # None: a unit diagonal
    if log_decay is None:
        return rq, rk, rlam, None
    axis = -2 if is_per_channel(q, log_decay) else -1
    flipped = ops.flip(log_decay, axis)
    first = [slice(None)] * flipped.ndim
    first[axis] = slice(None, 1)
    rest = list(first)
    rest[axis] = slice(None, -1)
    zero = ops.zeros(flipped[tuple(first)].shape, flipped)
    return rq, rk, rlam, ops.concat([zero, flipped[tuple(rest)]], axis)


def _through_reversal(
    op, ops: Ops, q, k, lam, log_decay, v, chunk_size, check_finite
) -> tuple[Array, Array]:
    """``op`` with ``T^T`` as ``P op(P T^T P) P``: reverse the rows, apply, reverse back."""
    rq, rk, rlam, rdecay = reversed_operands(ops, q, k, lam, log_decay)
    y, hn = op(
        ops, rq, rk, rlam, rdecay, ops.flip(v, -2), chunk_size=chunk_size, check_finite=check_finite
    )
    return ops.flip(y, -2), hn


def _ones_if_none(ops: Ops, lam: Array | None, q: Array) -> Array:
    """The diagonal, (..., n): ones for ``None`` (a unit diagonal)."""
    return ops.zeros(q.shape[:-1], q) + 1.0 if lam is None else lam


def _state_sequence(ops: Ops, ch: Chunked, contrib: Array, h0: Array | None) -> Array:
    """States entering each chunk: ``H[0] = h0``, ``H[J+1] = a_J H[J] + contrib[J]``.

    contrib: (..., nc, d, m).  Returns (..., nc + 1, d, m); the last entry is
    the state after the whole sequence.
    """
    nc, d, m = contrib.shape[-3:]
    states = ops.zeros((*contrib.shape[:-3], nc + 1, d, m), contrib)
    if h0 is not None:
        states[..., 0, :, :] = h0
    # A loop into one preallocated array: NumPy's cumsum along this axis is
    # ~20x slower, and hundreds of separately allocated states cost page faults.
    for j in range(nc):
        prev = states[..., j, :, :]
        if ch.chunk_decay is not None:
            prev = ch.state_decay(j) * prev
        states[..., j + 1, :, :] = prev + contrib[..., j, :, :]
    return states


def state_pass_adjoint(
    ops: Ops,
    ch: Chunked,
    wy: Array,
    du_local: Array,
    x_read: Array,
    dy_read: Array,
    dh_last: Array | None,
) -> tuple[Array, Array, Array]:
    """The reverse pass of a solve's chunk recurrence, from saved states.

    Forward, per chunk J: ``Y_J = Ỹ_J - W_J H_J`` (``W_J = T_JJ^-1 q_in_J``, ``wy``)
    and ``H_{J+1} = Diag(a_J) H_J + k_out_J^T Y_J``, and the states are read
    as ``x_read_J H_J`` by an output whose gradient is ``dy_read_J``.  Given
    ``du_local`` (..., nc, c, m), the gradient that reaches ``Y_J`` directly,
    and ``dh_last`` (..., d, m) or None, that of the final state, returns
    the total gradients of every ``Y_J``, of the state leaving every chunk
    (..., nc, d, m), and of ``H_0``::

        dY_J = du_local_J + k_out_J dH_{J+1}
        dH_J = Diag(a_J) dH_{J+1} + x_read_J^T dy_read_J - W_J^T dY_J

    The products ``x_read_J^T dy_read_J`` are formed for all chunks at once;
    the rest runs in the compiled reverse pass (:func:`dplr.core._jit.adjoint_pass`),
    two products of c x d by d x m per chunk, with the chunks in reverse order.
    """
    batch, (nc, c, m), d = du_local.shape[:-3], du_local.shape[-3:], wy.shape[-1]
    count = int(np.prod(batch))

    def stack(x: Array) -> Array:
        return x.reshape(count, nc, *x.shape[-2:])

    dh_add = ops.matmul(x_read.mT, dy_read)  # (..., nc, d, m)
    decay = None if ch.chunk_decay is None else ch.chunk_decay.reshape(count, nc, -1)
    dh_last = ops.zeros((count, d, m), du_local) if dh_last is None else dh_last
    dy, dh, dh0 = ops.adjoint_pass(
        stack(ch.k_out), stack(wy), decay, stack(du_local), stack(dh_add),
        dh_last.reshape(count, d, m), kernel=_jit.adjoint_pass,
    )  # fmt: skip
    return dy.reshape(*batch, nc, c, m), dh.reshape(*batch, nc, d, m), dh0.reshape(*batch, d, m)


def solve_blocks_transposed(ops: Ops, blocks: Array, rhs: Array) -> Array:
    """``blocks^-T rhs`` for a stack of lower-triangular blocks (..., c, c), rhs (..., c, r).

    One back substitution per block, reading the lower triangles of the
    blocks in place (:func:`dplr.core._jit.solve_lower_transposed_stack`).
    """
    return ops.solve_lower_transposed_blocks(blocks, rhs, kernel=_jit.solve_lower_transposed_stack)


def matmul(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    v: Array,
    *,
    transpose: bool = False,
    h0: Array | None = None,
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> tuple[Array, Array]:
    """``Y = T V + exp(G) ⊙ (Q h0)`` (or ``T^T V``), and the final state.

    The final state is ``exp(G[n-1]) h0 + sum_j exp(G[n-1] - G[j]) k_j v_j^T``.
    Cost O(n c (d + m) + n d m); every step is a batched matrix product over
    all chunks at once, except the O(nc d m) scan of the states.
    ``check_finite``: check the operands in the row-by-row loop, see
    :func:`solve`.
    """
    if transpose:
        if h0 is not None:
            raise NotImplementedError("an initial state is only defined for T, not T^T")
        return _through_reversal(matmul, ops, q, k, lam, log_decay, v, chunk_size, check_finite)
    if _rowwise.applies(q, v):  # small d: row by row
        return _rowwise.run(q, k, lam, log_decay, v, h0, solve=False, check_finite=check_finite)
    if check_finite:
        raise _rowwise.NonFiniteInput  # only the row-by-row loop checks: nothing was checked
    lam = _ones_if_none(ops, lam, q)
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    vc = chunk_rows(ops, v, ch.c)
    states = _state_sequence(ops, ch, ops.matmul(ch.k_out.mT, vc), h0)
    return _read_out(ops, ch, vc, states), states[..., -1, :, :]


def _read_out(
    ops: Ops, ch: Chunked, vc: Array, states: Array, strict: Array | None = None
) -> Array:
    """``Y_J = lam_J V_J + tril(T_JJ, -1) V_J + q_in_J H_J`` for all chunks at once
    (``strict``: the blocks ``tril(T_JJ, -1)`` if already formed)."""
    strict = strict_blocks(ops, ch) if strict is None else strict
    yc = ch.lam[..., None] * vc + ops.matmul(strict, vc)
    yc = yc + ops.matmul(ch.q_in, states[..., :-1, :, :])
    return unchunk_rows(yc, ch.n)


def solve(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    v: Array,
    *,
    transpose: bool = False,
    h0: Array | None = None,
    chunk_size: int | None = None,
    return_states: bool = False,
    check_finite: bool = False,
    check_v: bool = False,
) -> tuple[Array, Array]:
    """``Y = T^-1 (V - exp(G) ⊙ (Q h0))`` (or ``T^-T V``), and the final state.

    The state after row i is ``exp(G[i]) h0 + sum_{j<=i} exp(G[i] - G[j]) k_j y_j^T``;
    the second return value is the state after the last row or, with
    ``return_states``, the states entering every chunk and after the last one,
    shape (..., nc + 1, d, m).

    Algorithm (chunked forward substitution): the diagonal blocks ``T_JJ``
    for all chunks at once; then, chunk after chunk,
    ``Y_J = T_JJ^-1 (V_J - q_in_J H)`` (a triangular solve with the block)
    and ``H <- a_J H + k_out_J^T Y_J``.  Cost O(n c (d + m) + n d m).

    With ``check_finite`` the row-by-row loop (small d) checks what it reads
    and raises :class:`dplr.core._rowwise.NonFiniteInput` if it read a NaN or
    an Inf; where it does not run this raises it at once (nothing was
    checked).  ``check_v`` (not with ``transpose``): only v needs checking,
    which the chunked pass does as it reads v (see :func:`solve_chunked`).
    ``lam`` may be None: a unit diagonal.
    """
    if transpose:
        if h0 is not None or return_states:
            raise NotImplementedError("states are only defined for T, not T^T")
        if check_v:
            raise NotImplementedError("the pass checks v for T only, not T^T")
        return _through_reversal(solve, ops, q, k, lam, log_decay, v, chunk_size, check_finite)
    if not return_states and _rowwise.applies(q, v):  # small d: row by row
        checked = check_finite or check_v
        return _rowwise.run(q, k, lam, log_decay, v, h0, solve=True, check_finite=checked)
    if check_finite:
        raise _rowwise.NonFiniteInput  # only the row-by-row loop checks: nothing was checked
    lam = _ones_if_none(ops, lam, q)
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    blocks = diagonal_blocks(ops, ch, scratch=True)  # the blocks die here
    y, states = solve_chunked(ops, ch, blocks, v, h0, return_states, check_v=check_v)
    return (y, states) if return_states else (y, states[..., -1, :, :])


def diagonal_blocks(ops: Ops, ch: Chunked, *, scratch: bool = False) -> Array:
    """The diagonal blocks ``T_JJ`` of every chunk, (..., nc, c, c).

    Fresh, with zeros above the diagonal; with ``scratch`` (and no
    per-channel decay) only the lower triangles are written, by the
    compiled loop into scratch memory that the next such call reuses.
    """
    if ch.decay is None and scratch:
        out = ops.scratch("blocks", (*ch.q.shape[:-1], ch.c), ch.q)
        return ops.chunk_blocks(ch.q, ch.k, ch.lam, ch.mask, out, kernel=_jit.form_chunk_blocks)
    blocks = strict_blocks(ops, ch)  # fresh and contiguous: the diagonal goes in in place
    blocks.reshape(*blocks.shape[:-2], ch.c * ch.c)[..., :: ch.c + 1] = ch.lam
    return blocks


def solve_chunked(
    ops: Ops, ch: Chunked, blocks: Array, v: Array, h0: Array | None, keep_states: bool,
    *, check_v: bool = False,
) -> tuple[Array, Array]:  # fmt: skip
    """The chunked forward substitution of :func:`solve` given its chunks and blocks.

    ``blocks`` (..., nc, c, c) are the diagonal blocks ``T_JJ`` of ``ch``
    (lower triangles read only).  Returns Y (..., n, m) and the states
    (..., nc + 1, d, m) entering every chunk and after the last, or
    (..., 1, d, m), the final state only, unless ``keep_states``.
    ``check_v``: raise :class:`~dplr.core._rowwise.NonFiniteInput` after the
    pass unless the compiled pass ran and read only finite values of v.
    """
    vc = chunk_rows(ops, v, ch.c)
    finite: list[bool] = []  # one flag per lane of the compiled pass (list.append is atomic)

    def checking_pass(*args: object) -> None:
        finite.append(_jit.substitution_pass(*args))

    kernel = checking_pass if check_v else _jit.substitution_pass
    yc, states = _substitution_pass(
        ops, ch.q_in, blocks, ch.k_out, ch.chunk_decay, vc, h0, keep_states, kernel
    )
    if check_v and not (finite and all(finite)):
        raise _rowwise.NonFiniteInput
    return unchunk_rows(yc, ch.n), states


def _substitution_pass(
    ops: Ops,
    q_in: Array,
    blocks: Array,
    k_out: Array,
    chunk_decay: Array | None,
    vc: Array,
    h0: Array | None,
    keep_states: bool,
    kernel: Kernel = _jit.substitution_pass,
) -> tuple[Array, Array]:
    """The sequential part of the solve (the backend runs it, see ``substitution_pass``).

    ``Y_J = T_JJ^-1 (V_J - q_in_J H_J)`` and ``H_{J+1} = Diag(a_J) H_J + k_out_J^T Y_J``
    with ``H_0 = h0`` (a_J (..., nc) or per channel (..., nc, d)).  Returns Y
    (..., nc, c, m) and the states (..., nc + 1, d, m), or only the final
    state (..., 1, d, m) unless ``keep_states``.
    """
    batch, (nc, c, m), d = vc.shape[:-3], vc.shape[-3:], q_in.shape[-1]
    count = int(np.prod(batch))
    q_in, blocks, k_out, vc = (
        x.reshape(count, nc, c, x.shape[-1]) for x in (q_in, blocks, k_out, vc)
    )
    decay = None if chunk_decay is None else chunk_decay.reshape(count, nc, -1)
    h0 = ops.zeros((count, d, m), vc) if h0 is None else h0.reshape(count, d, m)
    yc, st = ops.substitution_pass(q_in, blocks, k_out, decay, vc, h0, keep_states, kernel=kernel)
    return yc.reshape(*batch, nc, c, m), st.reshape(*batch, st.shape[1], d, m)


def inverse(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    *,
    chunk_size: int | None = None,
) -> Array:
    """Dense ``T^-1``, (..., n, n), by block rows (docs/algorithms.md, section 6).

    Block row J of the inverse is ``[-W_J H[:, :start], T_JJ^-1, 0]`` where
    ``W_J = T_JJ^-1 q_in_J`` (``wy``, the WY form) and
    ``H = sum_{j < start} D k_j (T^-1)[j, :]`` is the d x n state, ``start``
    the first row of chunk J.  Only the lower block triangle is computed:
    O(n^2 d + n c^2) flops.
    """
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    c, nc, d = ch.c, ch.nc, q.shape[-1]
    batch = q.shape[:-2]
    eye = ops.eye(c, q)
    diag_blocks = strict_blocks(ops, ch) + ch.lam[..., :, None] * eye
    rhs = ops.concat([ch.q_in, ops.broadcast_to(eye, (*ch.q_in.shape[:-1], c))], -1)
    wx = ops.solve_lower_blocks(diag_blocks, rhs, kernel=_jit.solve_lower_stack)
    wy, x = wx[..., :d], wx[..., d:]
    out = ops.zeros((*batch, nc * c, nc * c), q)
    h = ops.zeros((*batch, d, nc * c), q)
    for j in range(nc):
        start, stop = j * c, (j + 1) * c
        if j:
            out[..., start:stop, :start] = -(wy[..., j, :, :] @ h[..., :, :start])
        out[..., start:stop, start:stop] = x[..., j, :, :]
        update = ch.k_out[..., j, :, :].mT @ out[..., start:stop, :stop]
        if ch.chunk_decay is not None:
            h[..., :, :stop] = ch.state_decay(j) * h[..., :, :stop] + update
        else:
            h[..., :, :stop] = h[..., :, :stop] + update
    return out[..., : ch.n, : ch.n]


def dense(ops: Ops, q: Array, k: Array, lam: Array, log_decay: Array | None) -> Array:
    """The dense (..., n, n) matrix T, straight from the definition (channel by channel
    for per-channel decay: O(n^2) memory)."""
    n = q.shape[-2]
    strict = ops.strict_lower_mask(n, q)
    if log_decay is None:
        low = q @ k.mT
    else:
        channel = is_per_channel(q, log_decay)
        ld = log_decay if channel else log_decay[..., None]
        finite, reset = split_resets(ops, ld)
        g, r = finite.cumsum(-2), None if reset is None else reset.cumsum(-2)
        low = 0.0
        for c in range(ld.shape[-1]):
            rc = None if r is None else r[..., c]
            mask = decay_mask(ops, g[..., c], strict, rc)
            pair = q[..., :, c, None] * k[..., None, :, c] if channel else q @ k.mT
            low = low + pair * mask
    out = ops.where(strict, low, 0.0)
    return out + lam[..., :, None] * ops.eye(n, q)


def matmul_from_states(
    ops: Ops,
    q: Array,
    k: Array,
    lam: Array,
    log_decay: Array | None,
    v: Array,
    states: Array,
    *,
    chunk_size: int | None = None,
) -> Array:
    """``Y = T V + exp(G) ⊙ (Q h0)`` given the states entering every chunk.

    ``states`` (..., nc + 1, d, m) are those of :func:`matmul` for the same k,
    log_decay, v, h0 and chunk size, e.g. as returned by
    ``solve(..., return_states=True)`` when v is that solve's result (the
    delta rule).  Skips the state pass: O(n c (d + m) + n d m), all batched.
    """
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    return _read_out(ops, ch, chunk_rows(ops, v, ch.c), states)


def matmul_chunked(ops: Ops, ch: Chunked, strict: Array, v: Array, states: Array) -> Array:
    """:func:`matmul_from_states` given the chunks ``ch`` and their strict blocks
    ``strict = tril(T_JJ, -1)`` (..., nc, c, c) (:func:`strict_blocks`)."""
    return _read_out(ops, ch, chunk_rows(ops, v, ch.c), states, strict)
