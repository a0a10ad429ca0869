"""dplr.delta_rule and dplr.gated_delta_rule against the token-by-token recurrence.

The reference below is the definition, written out in the public layout
([B, T, H, K]) and run in float64.  It works on NumPy arrays and (for the
gradient tests) on torch tensors, where autograd through it is the reference
for the hand-written backward.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dplr
from dplr import reference

try:
    import torch
except ImportError:  # torch is optional: the torch tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


# ------------------------------------------------------------------------ helpers
def eps(dtype) -> float:
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def tolerance(dtype, T: int, K: int, V: int, chunk: int = 64) -> float:
    """Max-norm relative error allowed against the float64 recurrence.

    Each output is a sum of about ``chunk + K + V`` rounded products (the
    chunk's block, the state product), each with relative error ~eps; a
    factor 10 covers the triangular solve.  With unit-norm keys and beta in
    [0, 2] every step is a contraction, so the rounding errors of successive
    chunks are carried into the state but not amplified: they add up like a
    random walk, ``sqrt(number of chunks)``.
    """
    c = min(chunk, T)
    return 10 * (c + K + V) * np.sqrt(-(-T // c)) * eps(dtype)


def rel_err(actual, expected) -> float:
    """``max|a - e| / max(max|e|, 1)`` in float64.

    The test inputs are O(1), so a result that is small only by cancellation
    (a final state near zero, say) is judged at the scale of the terms that
    cancelled, not at its own.
    """
    a, e = (
        np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
        for x in (actual, expected)
    )
    return np.abs(a - e).max(initial=0.0) / max(np.abs(e).max(initial=0.0), 1.0)


def recurrence(q, k, v, beta, g=None, *, scale=None, s0=None, l2norm=False):
    """``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``; ``o_t = scale S_t^T q_t``.

    Token by token (:mod:`dplr.reference`), in the public layout; NumPy or
    torch (then differentiable).
    """
    kw = {"scale": scale, "initial_state": s0, "use_qk_l2norm": l2norm}
    if g is None:
        return reference.delta_rule_recurrent(q, k, v, beta, **kw)
    return reference.gated_delta_rule_recurrent(q, k, v, g, beta, **kw)


def make_inputs(rng, B, T, H, K, V, *, gated=False, state=False, l2norm=False, strong=False):
    """float64 inputs of the well-behaved family: unit-norm keys, beta in (0, 1)."""
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if not l2norm:  # else the function normalises: give it something to do
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V))
    beta = rng.uniform(0.0, 1.0, (B, T, H))
    g = -rng.uniform(0.0, 3.0 if strong else 0.3, (B, T, H)) if gated else None
    s0 = rng.standard_normal((B, H, K, V)) if state else None
    return q, k, v, beta, g, s0


def run(q, k, v, beta, g=None, **kw):
    if g is None:
        return dplr.delta_rule(q, k, v, beta, **kw)
    return dplr.gated_delta_rule(q, k, v, g, beta, **kw)


# ------------------------------------------------------------------ forward values
CASES = [  # (B, T, H, K, V, chunk): T = 1, T < chunk, T not a multiple, K != V, H, B > 1
    (1, 1, 1, 4, 4, None),
    (1, 5, 1, 3, 2, 16),
    (2, 37, 3, 6, 4, 8),
    (1, 130, 2, 8, 8, None),
    (3, 64, 2, 2, 5, 64),
    (1, 100, 1, 16, 3, 7),
]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "chunk"), CASES)
def test_matches_recurrence(B, T, H, K, V, chunk, gated, state):
    rng = np.random.default_rng(T * 100 + K)
    q, k, v, beta, g, s0 = make_inputs(rng, B, T, H, K, V, gated=gated, state=state)
    o, sn = run(q, k, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=chunk)
    o_ref, s_ref = recurrence(q, k, v, beta, g, s0=s0)
    tol = tolerance(np.float64, T, K, V, chunk or 64)
    assert o.shape == (B, T, H, V) and sn.shape == (B, H, K, V)
    assert rel_err(o, o_ref) < tol
    assert rel_err(sn, s_ref) < tol


@settings(max_examples=int(os.environ.get("DPLR_EXAMPLES", 40)), deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 90), H=st.integers(1, 2),
    K=st.integers(1, 9), V=st.integers(1, 9), chunk=st.sampled_from([None, 1, 3, 16]),
    gated=st.booleans(), state=st.booleans(), l2norm=st.booleans(),
    scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**31),
)  # fmt: skip
def test_property_matches_recurrence(B, T, H, K, V, chunk, gated, state, l2norm, scale, seed):
    rng = np.random.default_rng(seed)
    q, k, v, beta, g, s0 = make_inputs(rng, B, T, H, K, V, gated=gated, state=state, l2norm=l2norm)
    kw = {"scale": scale, "initial_state": s0, "use_qk_l2norm": l2norm}
    o, sn = run(q, k, v, beta, g, output_final_state=True, chunk_size=chunk, **kw)
    o_ref, s_ref = recurrence(q, k, v, beta, g, scale=scale, s0=s0, l2norm=l2norm)
    tol = tolerance(np.float64, T, K, V, chunk or 64)
    assert rel_err(o, o_ref) < tol
    assert rel_err(sn, s_ref) < tol


def test_gated_with_zero_decay_is_plain():
    rng = np.random.default_rng(3)
    q, k, v, beta, _, s0 = make_inputs(rng, 2, 77, 2, 5, 3, state=True)
    plain = dplr.delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True)
    gated = dplr.gated_delta_rule(
        q, k, v, np.zeros(beta.shape), beta, initial_state=s0, output_final_state=True
    )
    for a, b in zip(plain, gated, strict=True):
        assert rel_err(a, b) < tolerance(np.float64, 77, 5, 3)


def test_final_state_only_on_request_and_empty_sequence():
    rng = np.random.default_rng(4)
    q, k, v, beta, _, s0 = make_inputs(rng, 1, 10, 1, 3, 2, state=True)
    assert dplr.delta_rule(q, k, v, beta)[1] is None
    o, sn = dplr.delta_rule(
        q[:, :0], k[:, :0], v[:, :0], beta[:, :0], initial_state=s0, output_final_state=True
    )
    assert o.shape == (1, 0, 1, 2) and np.array_equal(sn, s0)
    # S_T = S_0 as a new array: writing into the result leaves the caller's state alone
    assert sn is not s0 and not np.shares_memory(sn, s0)
    sn[...] = 0.0
    assert np.abs(s0).max() > 0
    o, sn = dplr.delta_rule(q[:, :0], k[:, :0], v[:, :0], beta[:, :0], output_final_state=True)
    assert o.shape == (1, 0, 1, 2) and sn.shape == (1, 1, 3, 2) and not sn.any()


@needs_torch
def test_empty_sequence_state_is_a_torch_copy():
    rng = np.random.default_rng(4)
    q, k, v, beta, _, s0 = _torch(*make_inputs(rng, 1, 0, 1, 3, 2, state=True))
    _, sn = dplr.delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True)
    assert sn is not s0 and sn.data_ptr() != s0.data_ptr() and torch.equal(sn, s0)


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("gated", [False, True])
def test_zero_key_dimension_gives_zero_outputs(gated, scale):
    """K = 0: the state is (K, V) = (0, V), so every output is an empty sum, 0."""
    rng = np.random.default_rng(16)
    q, k, v, beta, g, _ = make_inputs(rng, 2, 9, 2, 0, 3, gated=gated)
    s0 = np.zeros((2, 2, 0, 3))
    o, sn = run(q, k, v, beta, g, scale=scale, initial_state=s0, output_final_state=True)
    o_ref, s_ref = recurrence(q, k, v, beta, g, scale=scale or 1.0, s0=s0)
    assert s_ref.shape == sn.shape
    assert o.shape == (2, 9, 2, 3) and sn.shape == (2, 2, 0, 3)
    np.testing.assert_array_equal(o, o_ref)
    np.testing.assert_array_equal(o, 0.0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_minus_inf_gate_resets_the_state(chunk):
    """g = -inf is a_t = 0: the state before t is forgotten, exactly."""
    rng = np.random.default_rng(18)
    q, k, v, beta, g, s0 = make_inputs(rng, 2, 30, 2, 4, 3, gated=True, state=True)
    g[:, [0, 7, 29], :] = -np.inf
    g[1, 13, 1] = -np.inf
    o, sn = dplr.gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk
    )
    o_ref, s_ref = recurrence(q, k, v, beta, g, s0=s0)
    assert np.isfinite(o).all() and np.isfinite(sn).all()
    tol = tolerance(np.float64, 30, 4, 3, chunk or 64)
    assert rel_err(o, o_ref) < tol and rel_err(sn, s_ref) < tol
    # after the reset at t = 7, outputs do not depend on S_0 at all
    o2, _ = dplr.gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)
    np.testing.assert_array_equal(o[:, 7:], o2[:, 7:])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_l2norm_keeps_zero_rows_zero(lib):
    if lib == "torch" and torch is None:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(14)
    q, k, v, beta, _, _ = make_inputs(rng, 1, 20, 1, 3, 2, l2norm=True)
    q[:, 3] = 0.0
    k[:, 5] = 0.0
    args = [x.astype(np.float32) for x in (q, k, v, beta)]
    if lib == "torch":
        args = [torch.tensor(x) for x in args]
    o, _ = dplr.delta_rule(*args, use_qk_l2norm=True)
    o = np.asarray(o)
    assert np.isfinite(o).all() and np.all(o[:, 3] == 0)


def test_strided_float32_input():
    rng = np.random.default_rng(5)
    q, k, v, beta, g, s0 = make_inputs(rng, 1, 50, 2, 4, 4, gated=True, state=True)
    o_ref, _ = recurrence(q, k, v, beta, g, s0=s0)
    # Non-contiguous views (every array transposed twice through a copy) in float32.
    f32 = [np.asfortranarray(x).astype(np.float32) for x in (q, k, v, beta, g, s0)]
    o, _ = dplr.gated_delta_rule(*f32[:3], f32[4], f32[3], initial_state=f32[5])
    assert o.dtype == np.float32
    assert rel_err(o, o_ref) < tolerance(np.float32, 50, 4, 4)


# ------------------------------------------------------------------- cu_seqlens
@pytest.mark.parametrize("gated", [False, True])
def test_cu_seqlens_matches_separate_runs(gated):
    rng = np.random.default_rng(6)
    lengths = [5, 0, 70, 1, 33]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    T, H, K, V = int(cu[-1]), 2, 4, 3
    q, k, v, beta, g, _ = make_inputs(rng, 1, T, H, K, V, gated=gated)
    s0 = rng.standard_normal((len(lengths), H, K, V))
    o, sn = run(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                cu_seqlens=cu, chunk_size=16)  # fmt: skip
    assert o.shape == (1, T, H, V) and sn.shape == (len(lengths), H, K, V)
    assert np.isfinite(o).all() and np.isfinite(sn).all()
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        part = [None if x is None else x[:, a:b] for x in (q, k, v, beta, g)]
        o_ref, s_ref = recurrence(*part, s0=s0[i : i + 1])
        tol = tolerance(np.float64, max(b - a, 1), K, V, 16)
        assert rel_err(o[:, a:b], o_ref) < tol, f"sequence {i}"
        assert rel_err(sn[i : i + 1], s_ref) < tol, f"state of sequence {i}"


# --------------------------------------------------------------------- stability
@pytest.mark.parametrize("case", ["strong decay", "beta near 2"])
def test_long_sequence_is_stable(case):
    rng = np.random.default_rng(7)
    T, H, K, V = 65536, 1, 4, 2
    q, k, v, beta, g, _ = make_inputs(rng, 1, T, H, K, V, gated=True, strong=True)
    if case == "beta near 2":  # I - beta k k^T: eigenvalue 1 - beta, a contraction up to 2
        beta = rng.uniform(1.9, 1.999, beta.shape)
        g = np.zeros_like(g)
    o, sn = dplr.gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_ref, s_ref = recurrence(q, k, v, beta, g)
    assert np.isfinite(o).all() and np.isfinite(sn).all()
    # Same per-token error budget as short sequences: contractions do not amplify.
    assert rel_err(o, o_ref) < tolerance(np.float64, T, K, V)
    assert rel_err(sn, s_ref) < tolerance(np.float64, T, K, V)
    o32, _ = dplr.gated_delta_rule(*(x.astype(np.float32) for x in (q, k, v, g, beta)))
    assert np.isfinite(o32).all()
    assert rel_err(o32, o_ref) < tolerance(np.float32, T, K, V)


# -------------------------------------------------------------------------- torch
def _torch(*xs, dtype=None, grad=False):
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        t = torch.tensor(x, dtype=dtype or torch.float64)
        out.append(t.requires_grad_(grad))
    return out


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_torch_values_and_dtypes(dtype, path):
    dtype = getattr(torch, dtype)
    rng = np.random.default_rng(9)
    arrays = make_inputs(rng, 2, 70, 2, 8, 4, gated=True, state=True)
    tq, tk, tv, tb, tg, ts = _torch(*arrays, dtype=dtype)
    o, sn = dplr.gated_delta_rule(tq, tk, tv, tg, tb, initial_state=ts, output_final_state=True)
    assert isinstance(o, torch.Tensor) and o.dtype == dtype and sn.dtype == dtype
    # The reference runs in float64 on the inputs as rounded to `dtype`.  Half
    # precision computes in float32 (its error bound) and rounds the result
    # once to `dtype` (at most half its eps, relative to the largest entry).
    q, k, v, beta, g, s0 = (x.double() for x in (tq, tk, tv, tb, tg, ts))
    o_ref, s_ref = recurrence(q, k, v, beta, g, s0=s0)
    half = dtype not in (torch.float64, torch.float32)
    tol = tolerance(torch.float32 if half else dtype, 70, 8, 4)
    tol += 0.5 * eps(dtype) if half else 0.0
    assert rel_err(o, o_ref) < tol
    assert rel_err(sn, s_ref) < tol


GRAD_NAMES = ["q", "k", "v", "beta", "g", "initial_state"]


def _grads(fn, inputs, wo, ws):
    o, sn = fn(inputs)
    loss = (o * wo).sum() + (sn * ws).sum()
    present = {n: x for n, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(present.values()))
    return dict(zip(present, grads, strict=True))


@needs_torch
@pytest.mark.parametrize(
    ("gated", "l2norm", "chunk", "T"),
    [(False, False, None, 40), (True, False, 8, 37), (True, True, 16, 50), (False, True, 1, 9)],
)
def test_gradients_match_autograd_through_recurrence(gated, l2norm, chunk, T, path):
    rng = np.random.default_rng(10)
    B, H, K, V = 2, 2, 5, 3
    arrays = make_inputs(rng, B, T, H, K, V, gated=gated, state=True, l2norm=l2norm)
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    wo = torch.tensor(rng.standard_normal((B, T, H, V)))
    ws = torch.tensor(rng.standard_normal((B, H, K, V)))

    def ours(x):
        return run(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                   output_final_state=True, chunk_size=chunk, use_qk_l2norm=l2norm)  # fmt: skip

    def reference(x):
        return recurrence(x["q"], x["k"], x["v"], x["beta"], x["g"], s0=x["initial_state"],
                          l2norm=l2norm)  # fmt: skip

    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    assert set(got) == set(want) == {n for n in GRAD_NAMES if inputs[n] is not None}
    tol = 10 * tolerance(torch.float64, T, K, V, chunk or 64)  # a backward pass is ~2 forwards
    for name in got:
        assert rel_err(got[name], want[name]) < tol, f"gradient of {name!r}"


@needs_torch
@pytest.mark.parametrize("chunk", [4, 8])
def test_gradients_at_minus_inf_gates_match_the_recurrence(chunk):
    """Resets (g = -inf) at the first and last token, on both sides of a chunk
    boundary and inside chunks, among strong decays: every gradient is finite
    and that of autograd through the token recurrence; a -inf entry gets 0."""
    rng = np.random.default_rng(19)
    B, T, H, K, V = 2, 30, 2, 4, 3
    arrays = make_inputs(rng, B, T, H, K, V, gated=True, state=True, strong=True)
    g = arrays[4]
    g[:, [0, 7, 8, 29], :] = -np.inf
    g[1, 13, 1] = -np.inf
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    wo = torch.tensor(rng.standard_normal((B, T, H, V)))
    ws = torch.tensor(rng.standard_normal((B, H, K, V)))

    def ours(x):
        return run(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                   output_final_state=True, chunk_size=chunk)  # fmt: skip

    def reference(x):
        return recurrence(x["q"], x["k"], x["v"], x["beta"], x["g"], s0=x["initial_state"])

    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    tol = 10 * tolerance(torch.float64, T, K, V, chunk)  # a backward pass is ~2 forwards
    for name in got:
        assert torch.isfinite(want[name]).all(), f"reference gradient of {name!r}"
        assert torch.isfinite(got[name]).all(), f"gradient of {name!r}"
        assert rel_err(got[name], want[name]) < tol, f"gradient of {name!r}"
    assert (got["g"][torch.tensor(g) == -np.inf] == 0).all()


@needs_torch
@pytest.mark.parametrize("gated", [False, True])
def test_several_passes_match_recurrence(gated, monkeypatch):
    """Long inputs run in passes of whole chunks; force several on a short one."""
    import dplr.attention._delta_grad as grad_module

    monkeypatch.setattr(grad_module, "PASS_ROWS", 24)  # 2 x 1 heads: 12 tokens, 3 chunks
    rng = np.random.default_rng(15)
    B, T, H, K, V = 2, 37, 1, 3, 2
    arrays = make_inputs(rng, B, T, H, K, V, gated=gated, state=True)
    assert grad_module.pass_length((B, T, H, K), 4) == 12
    o_np, s_np = run(*arrays[:5], initial_state=arrays[5], output_final_state=True, chunk_size=4)
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    wo = torch.tensor(rng.standard_normal((B, T, H, V)))
    ws = torch.tensor(rng.standard_normal((B, H, K, V)))

    def ours(x):
        return run(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                   output_final_state=True, chunk_size=4)  # fmt: skip

    def reference(x):
        return recurrence(x["q"], x["k"], x["v"], x["beta"], x["g"], s0=x["initial_state"])

    o_ref, s_ref = reference(inputs)
    tol = tolerance(np.float64, T, K, V, 4)
    assert rel_err(o_np, o_ref) < tol and rel_err(s_np, s_ref) < tol
    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    for name in got:
        assert rel_err(got[name], want[name]) < 10 * tol, f"gradient of {name!r}"


@needs_torch
def test_gradients_through_cu_seqlens():
    rng = np.random.default_rng(11)
    cu = [0, 3, 3, 20]
    q, k, v, beta, g, _ = make_inputs(rng, 1, 20, 1, 3, 2, gated=True)
    s0 = rng.standard_normal((3, 1, 3, 2))
    names = ["q", "k", "v", "beta", "g", "initial_state"]
    inputs = dict(zip(names, _torch(q, k, v, beta, g, s0, grad=True), strict=True))
    wo, ws = torch.tensor(rng.standard_normal((1, 20, 1, 2))), torch.tensor(s0 * 0.5)

    def ours(x):
        return dplr.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=cu,
                                     initial_state=x["initial_state"], output_final_state=True,
                                     chunk_size=4)  # fmt: skip

    def reference(x):
        parts = [recurrence(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], x["beta"][:, a:b],
                            x["g"][:, a:b], s0=x["initial_state"][i : i + 1])
                 for i, (a, b) in enumerate(itertools.pairwise(cu))]  # fmt: skip
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)

    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    for name in names:
        assert rel_err(got[name], want[name]) < 10 * tolerance(torch.float64, 17, 3, 2, 4), name


@needs_torch
@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck(gated):
    rng = np.random.default_rng(12)
    arrays = make_inputs(rng, 1, 11, 2, 3, 2, gated=gated, state=True)
    inputs = [x for x in _torch(*arrays, grad=True) if x is not None]

    def fn(*xs):
        q, k, v, beta, *rest = xs
        g = rest[0] if gated else None
        return run(q, k, v, beta, g, initial_state=rest[-1], output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)


@needs_torch
def test_backward_keeps_no_graph_of_the_chunk_loop():
    """The autograd graph has the same handful of nodes whatever the length."""

    def count_nodes(T):
        rng = np.random.default_rng(13)
        arrays = make_inputs(rng, 1, T, 1, 4, 4, gated=True, state=True)
        q, k, v, beta, g, s0 = _torch(*arrays, grad=True)
        o, sn = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=8,
                                      output_final_state=True)  # fmt: skip
        seen, stack = set(), [o.grad_fn, sn.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
        return len(seen)

    assert count_nodes(16) == count_nodes(800) < 40


@needs_torch
@pytest.mark.parametrize("gated", [False, True])
def test_second_derivatives_raise_a_clear_error(gated, path):
    rng = np.random.default_rng(17)
    q, k, v, beta, g, s0 = _torch(*make_inputs(rng, 1, 10, 1, 3, 2, gated=gated, state=True),
                                  grad=True)  # fmt: skip
    o, sn = run(q, k, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=4)
    dq, ds0 = torch.autograd.grad(o.sum() + sn.sum(), [q, s0], create_graph=True)
    with pytest.raises(NotImplementedError, match=r"second derivatives of dplr\.delta_rule"):
        (dq.sum() + ds0.sum()).backward()


# --------------------------------------------------------------- grouped value heads
def _grouped_inputs(rng, B, T, H, groups, K, V, gated):
    """Key heads H, value heads H * groups; the value-side arrays drawn per value head."""
    q, k, _, _, _, _ = make_inputs(rng, B, T, H, K, V)
    _, _, v, beta, g, s0 = make_inputs(rng, B, T, H * groups, K, V, gated=gated, state=True)
    return q, k, v, beta, g, s0


def _expand(x, groups):
    """Value head i reads key head i // groups: written as an index, not a repeat."""
    index = np.arange(x.shape[2] * groups) // groups
    return x[:, :, torch.as_tensor(index) if isinstance(x, torch.Tensor) else index]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("H", "groups", "T", "chunk"), [(1, 2, 37, 8), (2, 3, 5, None)])
def test_grouped_value_heads_match_recurrence(H, groups, T, chunk, gated):
    rng = np.random.default_rng(16 + groups)
    B, K, V = 2, 4, 3
    q, k, v, beta, g, s0 = _grouped_inputs(rng, B, T, H, groups, K, V, gated)
    o, sn = run(q, k, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=chunk)
    o_ref, s_ref = recurrence(_expand(q, groups), _expand(k, groups), v, beta, g, s0=s0)
    assert o.shape == (B, T, H * groups, V) and sn.shape == (B, H * groups, K, V)
    tol = tolerance(np.float64, T, K, V, chunk or 64)
    assert rel_err(o, o_ref) < tol and rel_err(sn, s_ref) < tol


@needs_torch
@pytest.mark.parametrize("gated", [False, True])
def test_grouped_value_heads_gradients(gated):
    """The gradients of q and k sum over the value heads that share them."""
    rng = np.random.default_rng(17)
    B, T, H, groups, K, V = 1, 21, 2, 2, 3, 2
    arrays = _grouped_inputs(rng, B, T, H, groups, K, V, gated)
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    wo = torch.tensor(rng.standard_normal((B, T, H * groups, V)))
    ws = torch.tensor(rng.standard_normal((B, H * groups, K, V)))

    def ours(x):
        return run(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                   output_final_state=True, chunk_size=4)  # fmt: skip

    def reference(x):
        return recurrence(_expand(x["q"], groups), _expand(x["k"], groups), x["v"], x["beta"],
                          x["g"], s0=x["initial_state"])  # fmt: skip

    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    assert got["q"].shape == (B, T, H, K)
    for name in got:
        assert rel_err(got[name], want[name]) < 10 * tolerance(torch.float64, T, K, V, 4), name


def test_value_heads_must_be_a_multiple_of_key_heads():
    rng = np.random.default_rng(18)
    q, k, _, _, _, _ = make_inputs(rng, 1, 6, 2, 3, 2)
    _, _, v, beta, _, _ = make_inputs(rng, 1, 6, 3, 3, 2)
    with pytest.raises(ValueError, match=r"'v'.*multiple of H = 2"):
        dplr.delta_rule(q, k, v, beta)
    with pytest.raises(ValueError, match="'beta'"):
        dplr.delta_rule(q, k, np.concatenate([v, v[:, :, :1]], 2), beta)
