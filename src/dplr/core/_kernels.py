"""Chunked kernels for ``T = diag(lam) + tril(Q K^T ⊙ D, -1)``.

The derivations are in ``docs/algorithms.md`` (section 1).  All functions here
are pure, backend-neutral (NumPy or torch through ``ops``) and assume clean
input: same dtype, finite, batch dimensions already broadcast, so that

    q, k : (..., n, d)      lam : (..., n)      v : (..., n, m)      state h : (..., d, m)
    log_decay : (..., n) (one decay per row), (..., n, d) (per channel) or None

With one decay per row, ``T_ij = q_i . k_j exp(G_i - G_j)`` for i > j, with
``G = cumsum(log_decay)``; per channel, ``T_ij = sum_c q_ic k_jc exp(G_ic -
G_jc)``.  The state decays per channel in the same way (``Diag(a) h``).  A
``-inf`` entry is an exact reset (:mod:`dplr.core._decay`).  Decay factors
are only ever formed relative to the start of a chunk or to an anchor row
inside it, so no exponent overflows however long the sequence.

Chunking happens here and nowhere else in the library: the delta rule and the
Cholesky update call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._runtime.backend import Array, Ops
from .._runtime.tuning import CHUNK_ROWS as DEFAULT_CHUNK
from .._runtime.tuning import PANEL_MIN_ROWS
from . import _jit
from ._decay import ChunkDecay, channel_strict_blocks, chunk_decay, rel_exp, split_resets


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
) -> Chunked:
    """Cut the operands of T into chunks and form the per-chunk quantities.

    The blocks ``T_JJ`` themselves are left to the caller: the solve forms
    them in compiled code, the others with :func:`strict_blocks`.
    ``log_decay`` is (..., n), (..., n, d) or None; ``-inf`` entries are
    exact resets.
    """
    n = q.shape[-2]
    c = effective_chunk(n, chunk_size)
    qc, kc = chunk_rows(ops, q, c), chunk_rows(ops, k, c)
    lamc = chunk_rows(ops, lam[..., None], c, 1.0)[..., 0]
    if log_decay is None:
        return Chunked(qc, kc, lamc, None, qc, kc, None, n, c)
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
        q=qc,
        k=kc,
        lam=lamc,
        mask=mask,
        q_in=qc * w_in,
        k_out=kc * w_out,
        chunk_decay=a if channel else a[..., 0],
        n=n,
        c=c,
        decay=dec if channel else None,
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
    return ops.exp(ops.where(strict, rel, -float("inf")))


def reversed_operands(
    ops: Ops, q: Array, k: Array, lam: Array, log_decay: Array | None
) -> tuple[Array, Array, Array, Array | None]:
    """Operands of ``P T^T P`` (P the reversal permutation), again lower triangular.

    ``(P T^T P)[i, j] = T[n-1-j, n-1-i]``: the roles of q and k swap, rows are
    reversed, and the decay between rows i-1 and i becomes ``log_decay[n-i]``
    (per channel alike).
    """
    rq, rk, rlam = ops.flip(k, -2), ops.flip(q, -2), ops.flip(lam, -1)
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


def _through_reversal(op, ops: Ops, q, k, lam, log_decay, v, chunk_size) -> tuple[Array, Array]:
    """``op`` with ``T^T`` as ``P op(P T^T P) P``: reverse the rows, apply, reverse back."""
    rq, rk, rlam, rdecay = reversed_operands(ops, q, k, lam, log_decay)
    y, hn = op(ops, rq, rk, rlam, rdecay, ops.flip(v, -2), chunk_size=chunk_size)
    return ops.flip(y, -2), hn


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
) -> tuple[Array, Array]:
    """``Y = T V + exp(G) ⊙ (Q h0)`` (or ``T^T V``), and the final state.

    The final state is ``exp(G[n-1]) h0 + sum_j exp(G[n-1] - G[j]) k_j v_j^T``.
    Cost O(n c (d + m) + n d m); every step is a batched matrix product over
    all chunks at once, except the O(nc d m) scan of the states.
    """
    if transpose:
        if h0 is not None:
            raise NotImplementedError("an initial state is only defined for T, not T^T")
        return _through_reversal(matmul, ops, q, k, lam, log_decay, v, chunk_size)
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    vc = chunk_rows(ops, v, ch.c)
    states = _state_sequence(ops, ch, ops.matmul(ch.k_out.mT, vc), h0)
    return _read_out(ops, ch, vc, states), states[..., -1, :, :]


def _read_out(ops: Ops, ch: Chunked, vc: Array, states: Array) -> Array:
    """``Y_J = lam_J V_J + tril(T_JJ, -1) V_J + q_in_J H_J`` for all chunks at once."""
    yc = ch.lam[..., None] * vc + ops.matmul(strict_blocks(ops, ch), vc)
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
) -> tuple[Array, Array]:
    """``Y = T^-1 (V - exp(G) ⊙ (Q h0))`` (or ``T^-T V``), and the final state.

    The state after row i is ``exp(G[i]) h0 + sum_{j<=i} exp(G[i] - G[j]) k_j y_j^T``;
    the second return value is the state after the last row or, with
    ``return_states``, the states entering every chunk and after the last one,
    shape (..., nc + 1, d, m).

    Algorithm (chunked forward substitution): the diagonal blocks ``T_JJ``
    for all chunks at once; then, chunk after chunk,
    ``Y_J = T_JJ^-1 (V_J - q_in_J Z)`` (a triangular solve with the block)
    and ``Z <- a_J Z + k_out_J^T Y_J``.  Cost O(n c (d + m) + n d m).
    """
    if transpose:
        if h0 is not None or return_states:
            raise NotImplementedError("states are only defined for T, not T^T")
        return _through_reversal(solve, ops, q, k, lam, log_decay, v, chunk_size)
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    if ch.decay is None:
        # The blocks die here: they live in scratch memory.
        out = ops.scratch("blocks", (*ch.q.shape[:-1], ch.c), q)
        blocks = ops.chunk_blocks(ch.q, ch.k, ch.lam, ch.mask, out, kernel=_jit.form_chunk_blocks)
    else:
        blocks = strict_blocks(ops, ch) + ch.lam[..., None] * ops.eye(ch.c, q)
    yc, states = _substitution_pass(
        ops, ch.q_in, blocks, ch.k_out, ch.chunk_decay, chunk_rows(ops, v, ch.c), h0, return_states
    )
    y = unchunk_rows(yc, ch.n)
    return (y, states) if return_states else (y, states[..., -1, :, :])


def _substitution_pass(
    ops: Ops,
    q_in: Array,
    blocks: Array,
    k_out: Array,
    chunk_decay: Array | None,
    vc: Array,
    h0: Array | None,
    keep_states: bool,
) -> tuple[Array, Array]:
    """The sequential part of the solve (the backend runs it, see ``substitution_pass``).

    ``Y_J = T_JJ^-1 (V_J - q_in_J Z_J)`` and ``Z_{J+1} = Diag(a_J) Z_J + k_out_J^T Y_J``
    with ``Z_0 = h0`` (a_J (..., nc) or per channel (..., nc, d)).  Returns Y
    (..., nc, c, m) and the states (..., nc + 1, d, m), or only the final
    state (..., 1, d, m) unless ``keep_states``.
    """
    batch, (nc, c, m), d = vc.shape[:-3], vc.shape[-3:], q_in.shape[-1]
    count = int(np.prod(batch))
    q_in, blocks, k_out, vc = (
        x.reshape(count, nc, c, x.shape[-1]) for x in (q_in, blocks, k_out, vc)
    )
    decay = None if chunk_decay is None else chunk_decay.reshape(count, nc, -1)
    z0 = ops.zeros((count, d, m), vc) if h0 is None else h0.reshape(count, d, m)
    yc, st = ops.substitution_pass(
        q_in, blocks, k_out, decay, vc, z0, keep_states, kernel=_jit.substitution_pass
    )
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

    Block row J of the inverse is ``[-W_J Z[:, :s], T_JJ^-1, 0]`` where
    ``W_J = T_JJ^-1 q_in_J`` and ``Z = sum_{j < s} D k_j (T^-1)[j, :]`` is the
    d x n state.  Only the lower block triangle is computed: O(n^2 d + n c^2)
    flops.
    """
    ch = make_chunked(ops, q, k, lam, log_decay, chunk_size)
    c, nc, d = ch.c, ch.nc, q.shape[-1]
    batch = q.shape[:-2]
    eye = ops.eye(c, q)
    diag_blocks = strict_blocks(ops, ch) + ch.lam[..., :, None] * eye
    rhs = ops.concat([ch.q_in, ops.broadcast_to(eye, (*ch.q_in.shape[:-1], c))], -1)
    wx = ops.solve_lower_blocks(diag_blocks, rhs, kernel=_jit.solve_lower_stack)
    w, x = wx[..., :d], wx[..., d:]
    out = ops.zeros((*batch, nc * c, nc * c), q)
    z = ops.zeros((*batch, d, nc * c), q)
    for j in range(nc):
        s, e = j * c, (j + 1) * c
        if j:
            out[..., s:e, :s] = -(w[..., j, :, :] @ z[..., :, :s])
        out[..., s:e, s:e] = x[..., j, :, :]
        update = ch.k_out[..., j, :, :].mT @ out[..., s:e, :e]
        if ch.chunk_decay is not None:
            z[..., :, :e] = ch.state_decay(j) * z[..., :, :e] + update
        else:
            z[..., :, :e] = z[..., :, :e] + update
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


# ------------------------------------------------- Cholesky of a low-rank update
# ``chol(I + W C W^T) = diag(lam) + tril(W P^T, -1)`` (docs/cholesky.md): the
# chunked Schur recursion that yields lam and P, and the block-column product
# of a dense lower factor with that structured factor.  Used by dplr.cholesky.


def cholesky_flagged(ops: Ops, a: Array) -> tuple[Array, Array]:
    """Lower Cholesky factors of a stack of small SPD blocks, and where it worked.

    Returns ``(lt, ok)``: ``ok`` (...) is False for a block that is not
    positive definite, whose ``lt`` is then the identity (so that the callers'
    arithmetic stays finite; they discard those entries).
    """
    if ops.name == "torch":
        lt, info = _torch().linalg.cholesky_ex(a)
        ok = info == 0
        if not bool(ok.all()):
            lt = ops.where(ok[..., None, None], lt, ops.eye(a.shape[-1], a))
        return lt, ok
    import numpy as np

    try:
        return np.linalg.cholesky(a), np.ones(a.shape[:-2], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    flat = a.reshape(-1, *a.shape[-2:])
    lt = np.empty_like(flat)
    ok = np.ones(flat.shape[0], dtype=bool)
    for i in range(flat.shape[0]):
        try:
            lt[i] = np.linalg.cholesky(flat[i])
        except np.linalg.LinAlgError:
            lt[i] = np.eye(a.shape[-1], dtype=a.dtype)
            ok[i] = False
    return lt.reshape(a.shape), ok.reshape(a.shape[:-2])


def solve_lower_dense(ops: Ops, lower: Array, b: Array) -> Array:
    """``lower^-1 b`` for a dense lower-triangular matrix (only its triangle is read).

    lower: (..., n, n), b: (..., n, m), batch dimensions broadcast.  One
    triangular solve (``trsm``) per batch entry.
    """
    if ops.name == "torch":
        return _torch().linalg.solve_triangular(lower, b, upper=False)
    import numpy as np
    from scipy.linalg import solve_triangular

    batch = np.broadcast_shapes(lower.shape[:-2], b.shape[:-2])
    if not batch:
        return solve_triangular(lower, b, lower=True, check_finite=False)
    lb = np.broadcast_to(lower, (*batch, *lower.shape[-2:]))
    bb = np.broadcast_to(b, (*batch, *b.shape[-2:]))
    out = np.empty(bb.shape, dtype=np.result_type(lower, b))
    for idx in np.ndindex(*batch):
        out[idx] = solve_triangular(lb[idx], bb[idx], lower=True, check_finite=False)
    return out


def schur_chunk(ops: Ops, w_j: Array, c_state: Array) -> tuple[Array, Array, Array, Array]:
    """One chunk J of the Schur recursion for ``chol(I + W C W^T)``.

    ``A_JJ = I + W_J C W_J^T``, ``Lt_JJ = chol(A_JJ)``, ``P_J = Lt_JJ^-1 W_J C``
    (rows of P), ``C <- C - P_J^T P_J``.  w_j: (..., c, M), c_state: (..., M, M).
    Returns ``(Lt_JJ, P_J, C_next, ok)``; ``ok`` is False where A_JJ is not
    positive definite, i.e. where ``I + W C W^T`` is not.
    """
    wc = w_j @ c_state
    lt, ok = cholesky_flagged(ops, wc @ w_j.mT + ops.eye(w_j.shape[-2], w_j))
    p = solve_lower_dense(ops, lt, wc)
    return lt, p, c_state - p.mT @ p, ok


def lowrank_cholesky(
    ops: Ops, w: Array, c0: Array, *, chunk_size: int | None = None
) -> tuple[Array, Array, Array, list[tuple[Array, Array, Array]]]:
    """``chol(I + W C0 W^T) = diag(lam) + tril(W P^T, -1)``: returns ``(lam, P, ok, steps)``.

    w: (..., n, M), c0: (..., M, M) symmetric.  The factor is exactly the
    ``LowRankTril(W, P, diag=lam)``; ``ok`` (...) is False where ``I + W C0
    W^T`` is not positive definite; ``steps`` holds ``(W_J, Lt_JJ, P_J)`` of
    every chunk (the last one zero-padded) for :func:`lowrank_cholesky_product`.
    Chunks of c rows: O(n (c + M) M) flops.
    """
    n = w.shape[-2]
    c = effective_chunk(n, chunk_size)
    wc = chunk_rows(ops, w, c)  # zero rows pad the last chunk: their A_JJ = I
    c_state, ok, lams, ps, steps = c0, None, [], [], []
    for j in range(wc.shape[-3]):
        lt, p, c_state, ok_j = schur_chunk(ops, wc[..., j, :, :], c_state)
        ok = ok_j if ok is None else ok & ok_j
        lams.append(lt.diagonal(0, -2, -1)[..., None, :])
        ps.append(p[..., None, :, :])
        steps.append((wc[..., j, :, :], lt, p))
    lam = ops.concat(lams, -2).reshape(*wc.shape[:-3], -1)[..., :n]
    return lam, unchunk_rows(ops.concat(ps, -3), n), ok, steps


def lowrank_cholesky_product(
    ops: Ops,
    lower: Array,
    u: Array,
    c0: Array,
    out: Array,
    *,
    chunk_size: int | None = None,
    steps: list[tuple[Array, Array, Array]] | None = None,
    clean: bool = True,
    panel_threads: int | None = None,
) -> tuple[Array | None, list[tuple[Array, Array, Array]]]:
    """``out = L chol(I + W C0 W^T)`` with ``W = L^-1 U``, block column by block column.

    With ``Lt = chol(I + W C0 W^T)``, block column J of ``L Lt`` is
    ``L[:, J] Lt_JJ + S_J P_J^T`` where ``S_J = U - L[:, ..J] W[..J]`` is the
    residual of the forward substitution (nonzero below J only).  One pass over
    the lower triangle of L: W_J comes from that residual (a c x c solve), the
    Schur step of :func:`schur_chunk` gives Lt_JJ and P_J, and two products
    with the panel ``Z = [L[below J, J], S]`` finish the column:
    ``S <- S - L[below J, J] W_J`` and ``L_B[below J, J] = Z [Lt_JJ; P_J^T]``.
    L's zero blocks are never touched.  About ``N^2 (2 M + c)`` flops.

    lower: (..., N, N) (lower triangle read), u: (..., N, M), c0: (..., M, M),
    out: (..., N, N) with the full batch shape; it may be ``lower`` itself
    (each block column of L is read before it is overwritten).  ``steps`` (the
    ``(W_J, Lt_JJ, P_J)`` of every chunk, from :func:`lowrank_cholesky` with
    the same chunk size) skips the
    solves and Schur steps.  ``clean`` zeroes the strict upper triangle of
    ``out``.  ``panel_threads``: BLAS threads for the panel products, 0 for
    the library's default (NumPy; the small per-chunk operations then run in
    one thread); None leaves threading alone.
    Returns ``(ok, steps)``; ``ok`` (...) is False where the factor is not
    positive definite (those entries of ``out`` are garbage); it is None when
    ``steps`` were given (they were checked when they were made).
    """
    n, m = lower.shape[-1], u.shape[-1]
    c = effective_chunk(n, chunk_size)
    given = steps is not None
    steps = steps if given else []
    z = ops.zeros((*out.shape[:-2], n, c + m), out)
    z[..., c:] = u
    whole, small, big = _thread_scopes(ops, panel_threads)
    with whole():
        ok = _product_loop(ops, lower, z, c0, out, c, steps, given, clean, small, big)
    return ok, steps


def _product_loop(ops, lower, z, c_state, out, c, steps, given, clean, small, big):
    """The block columns of :func:`lowrank_cholesky_product`; returns ``ok``."""
    n, ok = lower.shape[-1], None
    for j, s in enumerate(range(0, n, c)):
        e = min(s + c, n)
        with small():
            l_jj = _tril_block(ops, lower[..., s:e, s:e])
            if given:  # possibly zero-padded: the leading block is the same
                w_j, lt, p = steps[j]
                w_j, lt, p = w_j[..., : e - s, :], lt[..., : e - s, : e - s], p[..., : e - s, :]
            else:
                w_j = solve_lower_dense(ops, l_jj, z[..., s:e, c:])
                lt, p, c_state, ok_j = schur_chunk(ops, w_j, c_state)
                ok = ok_j if ok is None else ok & ok_j
                steps.append((w_j, lt, p))
            out[..., s:e, s:e] = l_jj @ lt
        if e < n:  # only the last chunk can be short, and nothing lies below it
            with big() if n - e >= PANEL_MIN_ROWS else small():
                zp = z[..., e:, :c]
                zp[...] = lower[..., e:, s:e]
                z[..., e:, c:] -= zp @ w_j
                _matmul_into(ops, z[..., e:, :], ops.concat([lt, p.mT], -2), out[..., e:, s:e])
        if clean and s:
            out[..., :s, s:e] = 0.0
    return ok


def _matmul_into(ops: Ops, a: Array, b: Array, out: Array) -> None:
    """``out[...] = a @ b``; NumPy writes into a strided ``out`` without a temporary."""
    if ops.name == "numpy":
        import numpy as np

        np.matmul(a, b, out=out)
    else:
        out[...] = a @ b


def _thread_scopes(ops: Ops, panel_threads: int | None):
    """Context managers: around the whole loop, for small blocks, for the panel products
    (the process-wide BLAS limit of :mod:`dplr._runtime.blas`)."""
    return ops.blas_scopes(panel_threads)


def _tril_block(ops: Ops, a: Array) -> Array:
    return ops.where(ops.strict_lower_mask(a.shape[-1], a).mT, 0.0, a)


def _torch():
    import torch

    return torch
