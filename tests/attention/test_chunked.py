"""The compiled chunked forward (no gradient) against the definition.

The reference is the recurrence written out in float64, one token and one
head at a time, with grouped value heads and packed sequences:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

Tolerances: each output is a sum of about c + K + V rounded products (the
chunk's blocks, the state product), each with relative error ~eps, times 10
for the triangular solve; with unit-norm keys, beta in [0, 1] and decays
<= 1 every step is a contraction, so the errors of successive chunks add like
a random walk: ``10 (c + K + V) sqrt(T / c) eps`` relative to the largest
entry.  A wrong decay, sign or head mapping is O(1) off.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dplr
from dplr._runtime import threads, tuning
from dplr.attention import _chunked, delta
from dplr.attention._chunked import chunked_forward

try:
    import torch
except ImportError:  # torch is optional: the torch tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def reference(q, k, v, beta, g=None, *, scale=None, s0=None, cu=None, l2norm=False):
    """Outputs (B, T, HV, V) and final states (N, HV, K, V), token by token in float64."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    g = np.zeros((B, T, HV)) if g is None else np.asarray(g, np.float64)
    if l2norm:
        q = q / np.sqrt(np.maximum((q * q).sum(-1, keepdims=True), np.finfo(float).tiny))
        k = k / np.sqrt(np.maximum((k * k).sum(-1, keepdims=True), np.finfo(float).tiny))
    scale = K**-0.5 if scale is None else scale
    spans = [(b, 0, T) for b in range(B)] if cu is None else [
        (0, int(a), int(e)) for a, e in itertools.pairwise(cu)
    ]  # fmt: skip
    o = np.zeros((B, T, HV, V))
    states = np.zeros((len(spans), HV, K, V))
    for n, (b, start, stop) in enumerate(spans):
        for h in range(HV):
            hk = h // (HV // H)
            S = np.zeros((K, V)) if s0 is None else np.array(s0[n, h], np.float64)
            for t in range(start, stop):
                kt, bt = k[b, t, hk], beta[b, t, h]
                decay = np.exp(g[b, t, h])  # a scalar, or one per key channel
                S = (decay[:, None] if decay.ndim else decay) * S
                S = S - bt * np.outer(kt, kt @ S) + bt * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * (q[b, t, hk] @ S)
            states[n, h] = S
    return o, states


def inputs(rng, B, T, H, K, V, *, HV=None, N=None, dtype=np.float64, g_scale=1.0, channel=False):
    """Unit-norm keys, beta in (0, 1), log decays in [-g_scale, 0] (per head, or per key
    channel), an O(1) initial state."""
    HV = H if HV is None else HV
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V))
    beta = rng.uniform(0, 1, (B, T, HV))
    g = -g_scale * rng.uniform(0, 1, (B, T, HV, K) if channel else (B, T, HV))
    s0 = rng.standard_normal((B if N is None else N, HV, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, beta, g, s0))


def bound(dtype, T: int, c: int, K: int, V: int) -> float:
    c = max(1, min(c, T))
    return 10 * (c + K + V) * np.sqrt(-(-max(T, 1) // c)) * float(np.finfo(dtype).eps)


def rel_err(actual, expected) -> float:
    a = np.asarray(actual.detach() if hasattr(actual, "detach") else actual, np.float64)
    return np.abs(a - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1.0)


CASES = [  # (B, T, H, HV, K, V, chunk): T = 1, T < chunk, T not a multiple, K != V, groups
    (1, 1, 1, 1, 4, 4, 32),
    (1, 5, 1, 1, 3, 2, 16),
    (2, 37, 3, 3, 6, 4, 8),
    (1, 130, 2, 4, 8, 8, 32),
    (3, 64, 2, 2, 2, 5, 64),
    (1, 100, 1, 3, 16, 3, 7),
    (1, 9, 1, 1, 5, 5, 1),
]


@pytest.mark.parametrize("decay", ["none", "per head", "per channel"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize(("B", "T", "H", "HV", "K", "V", "chunk"), CASES)
def test_matches_recurrence(B, T, H, HV, K, V, chunk, decay, state):
    rng = np.random.default_rng(T * 100 + K + HV)
    channel = decay == "per channel"
    q, k, v, beta, g, s0 = inputs(rng, B, T, H, K, V, HV=HV, channel=channel)
    g, s0 = (None if decay == "none" else g), (s0 if state else None)
    o, sn = chunked_forward(False, q, k, v, beta, g, s0, None, 0.3, False, chunk)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, scale=0.3)
    assert o.shape == (B, T, HV, V) and sn.shape == (B, HV, K, V)
    assert rel_err(o, o_ref) < bound(np.float64, T, chunk, K, V)
    assert rel_err(sn, s_ref) < bound(np.float64, T, chunk, K, V)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 70), H=st.integers(1, 2), groups=st.integers(1, 2),
    K=st.integers(1, 9), V=st.integers(1, 9), chunk=st.sampled_from([1, 3, 16, 32]),
    l2norm=st.booleans(), g_scale=st.sampled_from([0.0, 0.5, 5.0, 50.0, 200.0]),
    channel=st.booleans(), seed=st.integers(0, 2**31),
)  # fmt: skip
def test_property_matches_recurrence(B, T, H, groups, K, V, chunk, l2norm, g_scale, channel,
                                     seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    q, k, v, beta, g, s0 = inputs(rng, B, T, H, K, V, HV=H * groups, g_scale=g_scale,
                                  channel=channel)  # fmt: skip
    o, sn = chunked_forward(False, q, k, v, beta, g, s0, None, 0.5, l2norm, chunk)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, scale=0.5, l2norm=l2norm)
    assert rel_err(o, o_ref) < bound(np.float64, T, chunk, K, V)
    assert rel_err(sn, s_ref) < bound(np.float64, T, chunk, K, V)


@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_float32_at_the_steepest_gate(chunk, channel):
    """g = -5 per token (a 64-token chunk spans e^-320): float32 within its bound.

    Per channel: -5 in half the channels, uniform in [-5, 0] in the others, so
    that the anchored sub-blocks are shorter than the chunk.
    """
    rng = np.random.default_rng(chunk)
    T, H, K, V = 2048, 1, 16, 8
    q, k, v, beta, _, s0 = inputs(rng, 1, T, H, K, V)
    if channel:
        g = -5.0 * rng.uniform(0, 1, (1, T, H, K))
        g[..., ::2] = -5.0
    else:
        g = np.full((1, T, H), -5.0)
        g[:, 1::7] = -0.01  # some slow tokens, so that long-range terms are not all below e^-40
    args32 = (x.astype(np.float32) for x in (q, k, v, beta, g, s0))
    o, sn = chunked_forward(False, *args32, None, 0.25, True, chunk)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, scale=0.25, l2norm=True)
    assert o.dtype == np.float32 and np.isfinite(o).all()
    assert rel_err(o, o_ref) < bound(np.float32, T, chunk, K, V)
    assert rel_err(sn, s_ref) < bound(np.float32, T, chunk, K, V)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_gates_reset_the_state(dtype):
    rng = np.random.default_rng(5)
    T, K, V = 70, 6, 4
    q, k, v, beta, g, s0 = inputs(rng, 1, T, 2, K, V)
    g[0, [0, 3, 4, 31, 32, 69], 0] = -np.inf  # chunk starts, ends, and two in a row
    g[0, 40, 1] = -np.inf
    args = (x.astype(dtype) for x in (q, k, v, beta, g, s0))
    o, sn = chunked_forward(False, *args, None, 0.4, False, 16)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, scale=0.4)
    assert np.isfinite(o).all() and np.isfinite(sn).all()
    assert rel_err(o, o_ref) < bound(dtype, T, 16, K, V)
    assert rel_err(sn, s_ref) < bound(dtype, T, 16, K, V)
    # The last token resets head 0: its state is that token's write alone.
    last = beta[0, -1, 0] * np.outer(k[0, -1, 0], v[0, -1, 0])
    assert rel_err(sn[0, 0], last) < bound(dtype, 1, 1, K, V)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_in_some_channels(dtype):
    """Resets of single channels, inside anchored sub-blocks (pair by pair) and at their edges."""
    rng = np.random.default_rng(15)
    T, K, V = 90, 6, 4
    q, k, v, beta, g, s0 = inputs(rng, 1, T, 2, K, V, channel=True, g_scale=5.0)
    for t, h, c in [
        (0, 0, 0),
        (5, 0, 1),
        (6, 0, 1),
        (17, 1, 5),
        (31, 0, 2),
        (32, 1, 0),
        (89, 0, 3),
    ]:
        g[0, t, h, c] = -np.inf
    args = (x.astype(dtype) for x in (q, k, v, beta, g, s0))
    o, sn = chunked_forward(False, *args, None, 0.4, True, 32)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, scale=0.4, l2norm=True)
    assert np.isfinite(o).all() and np.isfinite(sn).all()
    assert rel_err(o, o_ref) < bound(dtype, T, 32, K, V)
    assert rel_err(sn, s_ref) < bound(dtype, T, 32, K, V)


def test_packed_sequences_with_empty_ones():
    rng = np.random.default_rng(6)
    cu = np.array([0, 0, 13, 13, 50, 51])
    q, k, v, beta, g, s0 = inputs(rng, 1, 51, 2, 5, 3, HV=4, N=len(cu) - 1)
    o, sn = chunked_forward(False, q, k, v, beta, g, s0, cu, 0.5, True, 8)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, cu=cu, scale=0.5, l2norm=True)
    assert rel_err(o, o_ref) < bound(np.float64, 51, 8, 5, 3)
    assert rel_err(sn, s_ref) < bound(np.float64, 51, 8, 5, 3)
    np.testing.assert_array_equal(sn[[0, 2]], s0[[0, 2]])  # empty sequences keep their state


def test_parallel_lanes_match_one_thread(monkeypatch):
    """Lanes split over threads give the same bits as one thread."""
    rng = np.random.default_rng(7)
    args = inputs(rng, 3, 40, 2, 8, 8, HV=4)
    one = chunked_forward(False, *args, None, 0.5, True, 16)
    monkeypatch.setattr(tuning, "LOOP_MIN_FLOPS", 0)
    monkeypatch.setattr(_chunked, "num_workers", lambda: 3)
    calls = []
    monkeypatch.setattr(_chunked, "run_all", lambda fn, parts: calls.append(len(parts))
                        or threads.run_all(fn, parts))  # fmt: skip
    split = chunked_forward(False, *args, None, 0.5, True, 16)
    assert calls == [12]
    for a, b in zip(one, split, strict=True):
        np.testing.assert_array_equal(a, b)


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = delta.chunked_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(delta, "chunked_forward", spy)
    return calls


def test_public_functions_choose_it_without_gradients(monkeypatch):
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(8)
    T = tuning.RECURRENT_MAX_T + 5
    q, k, v, beta, g, s0 = inputs(rng, 1, T, 2, 4, 4)
    o, sn = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert len(calls) == 1
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0)
    assert rel_err(o, o_ref) < bound(np.float64, T, 32, 4, 4)
    assert rel_err(sn, s_ref) < bound(np.float64, T, 32, 4, 4)
    dplr.delta_rule(q[:, :3], k[:, :3], v[:, :3], beta[:, :3], chunk_size=2)
    assert len(calls) == 2
    dplr.delta_rule(q[:, :3], k[:, :3], v[:, :3], beta[:, :3])  # short: the recurrence
    assert len(calls) == 2
    dplr.kda(q, k, v, np.repeat(g[..., None], 4, axis=-1), beta)
    assert len(calls) == 3


@needs_torch
def test_torch_without_and_with_gradients(monkeypatch):
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(9)
    T = tuning.RECURRENT_MAX_T + 5
    arrays = inputs(rng, 1, T, 2, 8, 4, dtype=np.float32)
    q, k, v, beta, g, s0 = (torch.from_numpy(x) for x in arrays)
    with torch.no_grad():
        o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert len(calls) == 1 and isinstance(o, torch.Tensor) and o.dtype == torch.float32
    o_ref, s_ref = reference(*arrays[:5], s0=arrays[5])
    assert rel_err(o, o_ref) < bound(np.float32, T, 32, 8, 4)
    assert rel_err(s, s_ref) < bound(np.float32, T, 32, 8, 4)
    q.requires_grad_(True)  # gradients need the core's path and its hand-written backward
    o, _ = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert len(calls) == 1 and o.requires_grad


@pytest.mark.parametrize(("dtype", "budget"), [(np.float32, 80.0), (np.float64, 600.0)])
def test_vectorised_exponential_against_numpy(dtype, budget):
    """The loop's own exp: within 4 eps relative of float64 ``np.exp`` on [-budget, 0]
    (range reduction and Taylor remainder about 1 eps, _exp_rows' docstring), and
    exactly 0 below -budget and at -inf.  Rows wider than a vector and odd widths."""
    rng = np.random.default_rng(7)
    x = -budget * rng.uniform(0, 1, (6, 37))
    x[0, :8] = [0.0, -0.0, -1e-30, -budget, -budget * (1 - 1e-7), -budget - 1, -np.inf, -1e30]
    x[1] = -rng.uniform(0, 1, 37) * np.log(2) / 2  # |r| at its largest: m = 0, -1
    x = x.astype(dtype)
    out = np.empty_like(x)
    _chunked._exp_rows(x, out, dtype(budget))
    x64 = x.astype(np.float64)
    want = np.where(x64 >= -budget, np.exp(np.maximum(x64, -budget)), 0.0)
    inside = x64 >= -budget
    err = np.abs(out[inside] - want[inside]) / want[inside]
    assert err.max() <= 4 * np.finfo(dtype).eps
    assert np.all(out[~inside] == 0.0)
    assert out[0, 0] == 1.0 and out[0, 1] == 1.0


@pytest.mark.parametrize("decay", ["per head", "per channel"])
def test_model_head_size_over_a_long_sequence(decay):
    """K = V = 128 (the models' head size), float32, 1000 tokens with gates down
    to -5 per token, grouped value heads: within the float32 bound of the
    float64 recurrence."""
    rng = np.random.default_rng(7)
    T, H, HV, K, V = 1000, 1, 2, 128, 128
    q, k, v, beta, g, s0 = inputs(rng, 1, T, H, K, V, HV=HV, g_scale=5.0,
                                  channel=decay == "per channel")  # fmt: skip
    o, sn = chunked_forward(False, *(x.astype(np.float32) for x in (q, k, v, beta, g, s0)),
                            None, K**-0.5, True, 32)  # fmt: skip
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, l2norm=True)
    assert o.dtype == np.float32
    assert rel_err(o, o_ref) < bound(np.float32, T, 32, K, V)
    assert rel_err(sn, s_ref) < bound(np.float32, T, 32, K, V)
