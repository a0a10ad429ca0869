"""dplr.attention._chunked_grad: the compiled forward and backward under autograd.

The reference is autograd through the token-by-token recurrence of
:mod:`dplr.reference` (float64).  Bound: unit-norm keys (or normalised in the
call), beta in (0, 1): every step is a contraction, so the rounding of a
chunked pass is O((c + K + V) eps) per chunk, adding up like a random walk
over the chunks; a backward pass is about two forward passes, hence the
factor 20 below.  That is ~1e-12 here, far below any wrong or missing term
(O(1) relative), and float32 is held to the same bound with its own eps.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_err
from dplr import delta_rule, gated_delta_rule, kda, reference
from dplr.attention import _chunked_grad

torch = pytest.importorskip("torch")

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _bound(dtype, T: int, K: int, V: int, chunk: int) -> float:
    c = min(chunk, T)
    return 20 * 10 * (c + K + V) * np.sqrt(-(-T // c)) * torch.finfo(dtype).eps


def _inputs(rng, B, T, H, HV, K, V, *, gated, strong=False, resets=False, state=True):
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V))
    beta = rng.uniform(0.0, 1.0, (B, T, HV))
    g = None
    if gated:
        g = -rng.uniform(0.0, 6.0 if strong else 0.3, (B, T, HV))
        if resets:  # the first token, a chunk boundary's neighbours, inside a chunk
            g[:, [t for t in (0, 4, 5, 11) if t < T]] = -np.inf
    s0 = rng.standard_normal((B, HV, K, V)) if state else None
    return dict(zip(NAMES, (q, k, v, beta, g, s0), strict=True))


def _gradients(fn, arrays, dtype, seed=5):
    leaves = {n: torch.tensor(x, dtype=dtype, requires_grad=True)
              for n, x in arrays.items() if x is not None}  # fmt: skip
    o, sn = fn(leaves)
    rng = np.random.default_rng(seed)
    wo = torch.tensor(rng.standard_normal(o.shape), dtype=dtype)
    ws = torch.tensor(rng.standard_normal(sn.shape), dtype=dtype)
    loss = (o * wo).sum() + (sn * ws).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, sn, dict(zip(leaves, grads, strict=True))


def _ours(chunk, l2norm=False):
    def fn(x):
        kw = {"initial_state": x.get("initial_state"), "output_final_state": True,
              "chunk_size": chunk, "use_qk_l2norm": l2norm}  # fmt: skip
        if "g" in x:
            return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)

    return fn


def _reference(l2norm=False):
    def fn(x):
        kw = {"initial_state": x.get("initial_state"), "use_qk_l2norm": l2norm}
        if "g" in x:
            return reference.gated_delta_rule_recurrent(
                x["q"], x["k"], x["v"], x["g"], x["beta"], **kw
            )
        return reference.delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], **kw)

    return fn


@pytest.fixture
def calls(monkeypatch):
    """Counts the compiled backward's calls (to check which path ran)."""
    counter = {"backward": 0}
    original = _chunked_grad.backward

    def counted(*args):
        counter["backward"] += 1
        return original(*args)

    monkeypatch.setattr(_chunked_grad, "backward", counted)
    return counter


CASES = [  # (B, T, H, HV, K, V, chunk): c divides T, does not, T < c, T = 1, c = 1, grouped
    (2, 24, 2, 2, 5, 3, 4),
    (1, 23, 2, 2, 4, 6, 5),
    (2, 13, 1, 1, 3, 4, 32),
    (1, 1, 2, 2, 4, 3, 8),
    (1, 9, 1, 1, 3, 2, 1),
    (2, 19, 1, 2, 4, 3, 4),
    # the backward's substitution by blocks of 16 rows: two blocks, then a last chunk of 20
    # rows (blocks of 16 and 4); three blocks, then a last chunk below one block
    (1, 52, 1, 1, 3, 4, 32),
    (1, 45, 1, 1, 3, 2, 40),
]


@pytest.mark.parametrize(("B", "T", "H", "HV", "K", "V", "chunk"), CASES)
@pytest.mark.parametrize("decay", ["none", "mild", "strong", "resets"])
def test_gradients_match_autograd_through_the_recurrence(B, T, H, HV, K, V, chunk, decay, calls):
    rng = np.random.default_rng(T * 31 + K + HV)
    arrays = _inputs(rng, B, T, H, HV, K, V, gated=decay != "none", strong=decay == "strong",
                     resets=decay == "resets", state=decay != "mild")  # fmt: skip
    o, sn, got = _gradients(_ours(chunk), arrays, torch.float64)
    o_ref, s_ref, want = _gradients(_reference(), arrays, torch.float64)
    assert calls["backward"] == 1
    tol = _bound(torch.float64, T, K, V, chunk)
    assert rel_err(o, o_ref) < tol and rel_err(sn, s_ref) < tol
    assert set(got) == set(want)
    for name in got:
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], want[name]) < tol, name
    if decay == "resets":  # a -inf log decay gets no gradient
        assert (got["g"][:, [t for t in (0, 4, 5, 11) if t < T]] == 0).all()


@pytest.mark.parametrize("gated", [False, True])
def test_the_forward_keeps_each_chunks_blocks(gated):
    """The blocks the backward reads: ``I + A`` (lower triangle) and ``P`` (zero above its
    diagonal) of every chunk, a last chunk of L < c tokens in ``[:L, :L]``, against their
    definitions ``A_ij = beta_i (k_i . k_j) D_ij``, ``P_ij = (q_i . k_j) D_ij`` (i >= j),
    ``D_ij = exp(G_i - G_j)``."""
    rng = np.random.default_rng(7)
    B, T, H, K, V, c = 2, 27, 2, 3, 4, 8
    x = _inputs(rng, B, T, H, H, K, V, gated=gated, strong=True, state=False)
    args = [torch.tensor(x[n]) if x[n] is not None else None for n in ("q", "k", "v", "beta", "g")]
    *_, blocks = _chunked_grad.forward_saving(*args, None, c)
    assert blocks.shape == (B, H, -(-T // c), 2, c, c)
    for b in range(B):
        for h in range(H):
            for j, t0 in enumerate(range(0, T, c)):
                rows = slice(t0, min(t0 + c, T))
                q, k, beta = x["q"][b, rows, h], x["k"][b, rows, h], x["beta"][b, rows, h]
                G = np.cumsum(x["g"][b, rows, h]) if gated else np.zeros(len(q))
                decay = np.tril(np.exp(np.tril(G[:, None] - G[None, :])))
                a_want = np.eye(len(q)) + np.tril(beta[:, None] * (k @ k.T) * decay, -1)
                p_want = (q @ k.T) * decay
                L = len(q)
                np.testing.assert_allclose(np.tril(blocks[b, h, j, 0, :L, :L]), a_want,
                                           rtol=1e-12, atol=1e-14)  # fmt: skip
                np.testing.assert_allclose(blocks[b, h, j, 1, :L, :L], p_want, rtol=1e-12,
                                           atol=1e-14)  # fmt: skip


def test_the_forward_keeps_no_blocks_per_key_channel():
    """KDA: the backward forms the anchored blocks again; nothing of c x c size is kept."""
    rng = np.random.default_rng(8)
    x = _inputs(rng, 1, 10, 1, 1, 3, 2, gated=False, state=False)
    g = torch.tensor(-rng.uniform(0.0, 1.0, (1, 10, 1, 3)))
    args = [torch.tensor(x[n]) for n in ("q", "k", "v", "beta")]
    *_, blocks = _chunked_grad.forward_saving(*args, g, None, 4)
    assert blocks.shape == (1, 1, 3, 2, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_normalised_queries_and_keys(dtype, calls):
    rng = np.random.default_rng(7)
    arrays = _inputs(rng, 2, 70, 2, 4, 8, 6, gated=True, strong=True)
    arrays["k"] *= rng.uniform(0.5, 2.0, arrays["k"].shape[:-1])[..., None]  # normalised inside
    _, _, got = _gradients(_ours(16, l2norm=True), arrays, dtype)
    _, _, want = _gradients(_reference(l2norm=True), arrays, torch.float64)
    assert calls["backward"] == 1
    for name in got:
        assert got[name].dtype == dtype
        assert rel_err(got[name], want[name]) < _bound(dtype, 70, 8, 6, 16), name


def test_the_separate_steps_still_run_when_the_loops_are_off(monkeypatch, calls):
    """With the compiled loops off (as for tensors they cannot take) the
    autograd function runs the separate chunked steps, to the same gradients."""
    monkeypatch.setattr(_chunked_grad, "ENABLED", False)
    rng = np.random.default_rng(8)
    arrays = _inputs(rng, 2, 21, 1, 2, 4, 3, gated=True, resets=True)
    _, _, got = _gradients(_ours(4), arrays, torch.float64)
    _, _, want = _gradients(_reference(), arrays, torch.float64)
    assert calls["backward"] == 0
    for name in got:
        assert rel_err(got[name], want[name]) < _bound(torch.float64, 21, 4, 3, 4), name


def _kda_inputs(rng, B, T, H, HV, K, V, *, strong, resets):
    arrays = _inputs(rng, B, T, H, HV, K, V, gated=False)
    g = -rng.uniform(0.0, strong, (B, T, HV, K))
    if resets:  # one channel at one token, every channel at another
        g[:, min(3, T - 1), 0, 1 % K] = -np.inf
        g[:, [t for t in (5, 6) if t < T]] = -np.inf
    arrays["g"] = g
    return arrays


def _kda(chunk, l2norm=False):
    def fn(x):
        return kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                   output_final_state=True, chunk_size=chunk, use_qk_l2norm=l2norm)  # fmt: skip

    return fn


def _kda_reference(l2norm=False):
    def fn(x):
        kw = {"initial_state": x["initial_state"], "use_qk_l2norm": l2norm}
        return reference.kda_recurrent(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)

    return fn


@pytest.mark.parametrize(("B", "T", "H", "HV", "K", "V", "chunk"), CASES)
@pytest.mark.parametrize(("strong", "resets"), [(0.5, False), (30.0, False), (6.0, True)])
def test_kda_gradients_match_autograd_through_the_recurrence(B, T, H, HV, K, V, chunk, strong,
                                                             resets, calls):  # fmt: skip
    """One decay per key channel, anchored sub-blocks: mild decays (one sub-block per
    chunk), 30 per token (sub-blocks of a few rows in float64), resets of one channel and of
    all (pulled back pair by pair)."""
    rng = np.random.default_rng(T * 17 + K + HV)
    arrays = _kda_inputs(rng, B, T, H, HV, K, V, strong=strong, resets=resets)
    o, sn, got = _gradients(_kda(chunk), arrays, torch.float64)
    o_ref, s_ref, want = _gradients(_kda_reference(), arrays, torch.float64)
    assert calls["backward"] == 1
    tol = _bound(torch.float64, T, K, V, chunk)
    assert rel_err(o, o_ref) < tol and rel_err(sn, s_ref) < tol
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], want[name]) < tol, name
    if resets:
        assert (got["g"][np.isneginf(arrays["g"])] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kda_float32_at_g_minus_5_with_normalised_keys(dtype, calls):
    rng = np.random.default_rng(9)
    arrays = _kda_inputs(rng, 1, 70, 2, 2, 8, 6, strong=5.0, resets=False)
    arrays["g"][:] = -5.0  # the models' gate bound, every token and channel
    _, _, got = _gradients(_kda(16, l2norm=True), arrays, dtype)
    _, _, want = _gradients(_kda_reference(l2norm=True), arrays, torch.float64)
    assert calls["backward"] == 1
    for name in want:
        assert rel_err(got[name], want[name]) < _bound(dtype, 70, 8, 6, 16), name


def test_what_the_loops_take():
    x = torch.zeros(1, 4, 1, 2)
    g = torch.zeros(1, 4, 1)
    assert _chunked_grad.applies(x, g, (x, x, x, g))
    assert _chunked_grad.applies(x, None, (x, x, x))
    assert _chunked_grad.applies(x, x, (x, x, x, x))  # one decay per key channel
    assert not _chunked_grad.applies(x.half(), g.half(), (x.half(), g.half()))
    assert not _chunked_grad.applies(x, g, (x, g.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_at_the_model_head_size(dtype, calls):
    """K = V = 128 (the models' head size), grouped value heads, strong gates, a
    length that is not a multiple of the chunk: gradients within the bound."""
    rng = np.random.default_rng(128)
    arrays = _inputs(rng, 1, 75, 1, 2, 128, 128, gated=True, strong=True)
    _, _, got = _gradients(_ours(32), arrays, dtype)
    _, _, want = _gradients(_reference(), arrays, torch.float64)
    assert calls["backward"] == 1
    for name in got:
        assert rel_err(got[name], want[name]) < _bound(dtype, 75, 128, 128, 32), name
