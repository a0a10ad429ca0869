"""dplr.kda against Kimi Delta Attention written token by token (dplr.reference).

The reference is the definition, ``S_t = (I - beta_t k_t k_t^T) Diag(exp g_t)
S_{t-1} + beta_t k_t v_t^T``, run in float64; with torch tensors it is
differentiable, and autograd through it is the reference for the
hand-written backward.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dplr
from dplr.reference import kda_recurrent

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


#: The widest exponent the core lets one sub-block span (float32, float64).
EXPONENT_BUDGET = {4: 80.0, 8: 600.0}


def tolerance(dtype, T: int, K: int, V: int, chunk: int | None, steepest: float = 0.0) -> float:
    """Max-norm relative error allowed against the float64 recurrence.

    As for the delta rule (tests/attention/test_delta.py): each output sums
    about ``c + K + V`` rounded products, a factor 10 covers the block
    solve, and the chunks' errors add like a random walk (contractions do
    not amplify them).  Per channel the decay factors are ``exp`` of
    differences of cumulative sums G; G carries an absolute rounding error of
    about eps |G|, and |G| inside one sub-block is at most the exponent
    budget or the chunk's total decay, whichever is smaller: the factor
    ``1 + span`` below.  A wrong factor, mask or anchor errs by O(1).
    """
    c = min(chunk or 32, max(T, 1))
    itemsize = 4 if eps(dtype) > 1e-10 else 8
    span = min(c * steepest, EXPONENT_BUDGET[itemsize])
    return 10 * (c + K + V) * math.sqrt(-(-T // c) or 1) * eps(dtype) * (1 + span)


def rel_err(actual, expected) -> float:
    """``max|a - e| / max(max|e|, 1)`` in float64 (inputs are O(1))."""
    a, e = (
        np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
        for x in (actual, expected)
    )
    return np.abs(a - e).max(initial=0.0) / max(np.abs(e).max(initial=0.0), 1.0)


DECAYS = ["mild", "strong", "all -5", "-inf in some channels"]


def log_decay(rng, shape, kind: str) -> np.ndarray:
    """g <= 0 of shape (B, T, HV, K) for one of the families of :data:`DECAYS`."""
    if kind == "mild":
        return -rng.uniform(0.0, 0.3, shape)
    if kind == "strong":
        return -rng.uniform(0.0, 12.0, shape)
    if kind == "all -5":
        return np.full(shape, -5.0)
    g = -rng.uniform(0.0, 1.0, shape)
    g[rng.uniform(size=shape) < 0.05] = -np.inf  # a reset of one channel at one token
    g[..., 0] = -np.inf  # a channel that never keeps anything
    return g


def steepest(g) -> float:
    finite = np.asarray(g)[np.isfinite(g)]
    return float(-finite.min()) if finite.size else 0.0


def make_inputs(rng, B, T, H, HV, K, V, decay="mild", state=True):
    """float64 inputs: unit-norm keys, beta in (0, 1), grouped value heads."""
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V))
    beta = rng.uniform(0.0, 1.0, (B, T, HV))
    g = log_decay(rng, (B, T, HV, K), decay)
    s0 = rng.standard_normal((B, HV, K, V)) if state else None
    return q, k, v, g, beta, s0


def _torch(*xs, dtype=None, grad=False):
    return [
        None if x is None else torch.tensor(x, dtype=dtype or torch.float64).requires_grad_(grad)
        for x in xs
    ]


# ------------------------------------------------------------------ forward values
CASES = [  # (B, T, H, HV, K, V, chunk): T = 1, T < chunk, T not a multiple, K != V, HV = 2H
    (1, 1, 1, 1, 4, 4, None),
    (1, 5, 1, 2, 3, 2, 16),
    (2, 37, 2, 4, 6, 4, 8),
    (1, 70, 1, 2, 8, 5, None),
    (1, 64, 2, 2, 5, 3, 64),
]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize(("B", "T", "H", "HV", "K", "V", "chunk"), CASES)
def test_matches_recurrence(B, T, H, HV, K, V, chunk, decay, lib):
    if lib == "torch" and torch is None:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(T * 100 + K + HV)
    q, k, v, g, beta, s0 = make_inputs(rng, B, T, H, HV, K, V, decay)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    args = (q, k, v, g, beta, s0) if lib == "numpy" else _torch(q, k, v, g, beta, s0)
    o, sn = dplr.kda(*args[:5], initial_state=args[5], output_final_state=True, chunk_size=chunk)
    assert tuple(o.shape) == (B, T, HV, V) and tuple(sn.shape) == (B, HV, K, V)
    tol = tolerance(np.float64, T, K, V, chunk, steepest(g))
    assert tol < 1e-10
    assert rel_err(o, o_ref) < tol
    assert rel_err(sn, s_ref) < tol


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 60), H=st.integers(1, 2), groups=st.integers(1, 3),
    K=st.integers(1, 7), V=st.integers(1, 5), chunk=st.sampled_from([None, 1, 3, 16]),
    decay=st.sampled_from(DECAYS), l2norm=st.booleans(), scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**31),
)  # fmt: skip
def test_property_matches_recurrence(T, H, groups, K, V, chunk, decay, l2norm, scale, seed):
    rng = np.random.default_rng(seed)
    q, k, v, g, beta, s0 = make_inputs(rng, 1, T, H, H * groups, K, V, decay)
    kw = {"scale": scale, "initial_state": s0, "use_qk_l2norm": l2norm}
    o, sn = dplr.kda(q, k, v, g, beta, output_final_state=True, chunk_size=chunk, **kw)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, **kw)
    tol = tolerance(np.float64, T, K, V, chunk, steepest(g))
    assert rel_err(o, o_ref) < tol
    assert rel_err(sn, s_ref) < tol


def test_equal_channel_decays_are_the_gated_rule():
    """g equal over K is the gated delta rule (checked against its own recurrence too)."""
    rng = np.random.default_rng(3)
    q, k, v, _, beta, s0 = make_inputs(rng, 2, 45, 1, 2, 4, 3)
    g_row = -rng.uniform(0.0, 2.0, beta.shape)
    g = np.repeat(g_row[..., None], 4, axis=-1)
    o, sn = dplr.kda(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_gated, s_gated = dplr.gated_delta_rule(q, k, v, g_row, beta, initial_state=s0,
                                             output_final_state=True)  # fmt: skip
    tol = tolerance(np.float64, 45, 4, 3, None, 2.0)
    assert rel_err(o, o_gated) < tol and rel_err(sn, s_gated) < tol


def test_empty_input_and_final_state_on_request():
    rng = np.random.default_rng(4)
    q, k, v, g, beta, s0 = make_inputs(rng, 1, 6, 1, 2, 3, 2)
    assert dplr.kda(q, k, v, g, beta)[1] is None
    o, sn = dplr.kda(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], initial_state=s0,
                     output_final_state=True)  # fmt: skip
    assert o.shape == (1, 0, 2, 2) and np.array_equal(sn, s0) and sn is not s0


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_cu_seqlens_with_empty_sequences(lib):
    if lib == "torch" and torch is None:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(6)
    lengths = [5, 0, 40, 1, 0, 23]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    T, H, HV, K, V = int(cu[-1]), 1, 2, 4, 3
    q, k, v, g, beta, _ = make_inputs(rng, 1, T, H, HV, K, V, "-inf in some channels")
    s0 = rng.standard_normal((len(lengths), HV, K, V))
    args = (q, k, v, g, beta, s0) if lib == "numpy" else _torch(q, k, v, g, beta, s0)
    o, sn = dplr.kda(*args[:5], initial_state=args[5], output_final_state=True,
                     cu_seqlens=cu, chunk_size=8)  # fmt: skip
    assert tuple(o.shape) == (1, T, HV, V) and tuple(sn.shape) == (len(lengths), HV, K, V)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        part = (x[:, a:b] for x in (q, k, v, g, beta))
        o_ref, s_ref = kda_recurrent(*part, initial_state=s0[i : i + 1])
        tol = tolerance(np.float64, max(b - a, 1), K, V, 8, 1.0)
        assert rel_err(o[:, a:b], o_ref) < tol, f"sequence {i}"
        assert rel_err(sn[i : i + 1], s_ref) < tol, f"state of sequence {i}"


# --------------------------------------------------------------------- stability
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_float32_at_the_steepest_gate(chunk):
    """g = -5 per token per channel (a 64-token chunk spans e^-320): float32 keeps 1e-4."""
    rng = np.random.default_rng(7)
    B, T, H, HV, K, V = 1, 4096, 1, 1, 16, 16
    q, k, v, g, beta, _ = make_inputs(rng, B, T, H, HV, K, V, "all -5", state=False)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta)
    f32 = [x.astype(np.float32) for x in (q, k, v, g, beta)]
    o, sn = dplr.kda(*f32, output_final_state=True, chunk_size=chunk)
    assert o.dtype == np.float32 and np.isfinite(o).all()
    assert rel_err(o, o_ref) < 1e-4 and rel_err(sn, s_ref) < 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g_value", [0.0, -5.0, -60.0, -1000.0, -np.inf])
def test_no_nan_for_any_decay(g_value, dtype):
    rng = np.random.default_rng(8)
    q, k, v, g, beta, s0 = make_inputs(rng, 1, 40, 1, 2, 4, 3)
    g = np.full(g.shape, g_value)
    g[:, ::7, :, 1] = -np.inf  # resets mixed into every case
    args = [x.astype(dtype) for x in (q, k, v, g, beta, s0)]
    o, sn = dplr.kda(*args[:5], initial_state=args[5], output_final_state=True, chunk_size=16)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    tol = tolerance(dtype, 40, 4, 3, 16, steepest(g))
    assert rel_err(o, o_ref) < tol and rel_err(sn, s_ref) < tol


# ------------------------------------------------------------------ bad input
def _good():
    rng = np.random.default_rng(9)
    q, k, v, g, beta, _ = make_inputs(rng, 1, 12, 2, 4, 3, 2)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta}


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("g", lambda x: x[..., 0], r"'g'.*\(B, T, HV, K\)"),
        ("g", lambda x: x[:, :, :1], "'g'"),
        ("g", lambda x: -x + 0.5, "'g'.*<= 0"),
        ("g", lambda x: np.where(x < -0.1, np.nan, x), "'g'.*NaN"),
        ("v", lambda x: x[:, :, :3], "'v'.*multiple of H"),
        ("beta", lambda x: x[..., :1], "'beta'"),
        ("q", lambda x: np.where(x > 1, np.inf, x), "'q'.*Inf"),
    ],
)
def test_bad_arguments(name, change, match):
    args = _good()
    args[name] = change(args[name])
    with pytest.raises(ValueError, match=match):
        dplr.kda(args["q"], args["k"], args["v"], args["g"], args["beta"])


def test_decay_is_required():
    args = _good()
    with pytest.raises(TypeError, match="'g'"):
        dplr.kda(args["q"], args["k"], args["v"], None, args["beta"])


# -------------------------------------------------------------------------- torch
GRAD_NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def _grads(fn, inputs, wo, ws):
    o, sn = fn(inputs)
    loss = (o * wo).sum() + (sn * ws).sum()
    present = {n: x for n, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(present.values()))
    return dict(zip(present, grads, strict=True))


def _check_gradients(inputs, chunk, l2norm=False, cu=None, tol_scale=1.0):
    rng = np.random.default_rng(10)
    B, T, HV, V = inputs["v"].shape
    N = B if cu is None else len(cu) - 1
    K = inputs["q"].shape[-1]
    wo = torch.tensor(rng.standard_normal((B, T, HV, V)))
    ws = torch.tensor(rng.standard_normal((N, HV, K, V)))

    def ours(x):
        return dplr.kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                        output_final_state=True, chunk_size=chunk, use_qk_l2norm=l2norm,
                        cu_seqlens=cu)  # fmt: skip

    def reference(x):
        bounds = [0, T] if cu is None else cu
        parts = [
            kda_recurrent(*(x[n][:, a:b] for n in ("q", "k", "v", "g", "beta")),
                          initial_state=x["initial_state"][i : i + 1] if cu is not None
                          else x["initial_state"], use_qk_l2norm=l2norm)
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        ]  # fmt: skip
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)

    got, want = _grads(ours, inputs, wo, ws), _grads(reference, inputs, wo, ws)
    assert set(got) == set(want) == {n for n in GRAD_NAMES if inputs[n] is not None}
    # A backward pass is a few forward passes' worth of products: 10x the forward bound.
    g = inputs["g"].detach().numpy()
    tol = 10 * tol_scale * tolerance(torch.float64, T, K, V, chunk, steepest(g))
    for name in got:
        assert torch.isfinite(got[name]).all(), f"gradient of {name!r}"
        assert rel_err(got[name], want[name]) < tol, f"gradient of {name!r}"


@needs_torch
@pytest.mark.parametrize(
    ("decay", "chunk", "T", "l2norm"),
    [("mild", 8, 37, False), ("strong", 16, 50, True), ("all -5", 4, 21, False),
     ("-inf in some channels", 8, 30, False), ("mild", 1, 9, True)],
)  # fmt: skip
def test_gradients_match_autograd_through_recurrence(decay, chunk, T, l2norm):
    rng = np.random.default_rng(11)
    arrays = make_inputs(rng, 2, T, 1, 2, 5, 3, decay)
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    _check_gradients(inputs, chunk, l2norm)


@needs_torch
def test_gradients_through_cu_seqlens():
    rng = np.random.default_rng(12)
    cu = [0, 3, 3, 20]
    q, k, v, g, beta, _ = make_inputs(rng, 1, 20, 1, 2, 3, 2, "-inf in some channels")
    s0 = rng.standard_normal((3, 2, 3, 2))
    inputs = dict(zip(GRAD_NAMES, _torch(q, k, v, g, beta, s0, grad=True), strict=True))
    _check_gradients(inputs, 4, cu=cu)


@needs_torch
def test_several_passes(monkeypatch):
    """Long inputs run in passes of whole chunks; force several on a short one."""
    import dplr.attention._delta_grad as grad_module

    monkeypatch.setattr(grad_module, "PASS_ROWS", 24)  # 2 x 2 heads: 4-token chunks, 2 per pass
    rng = np.random.default_rng(13)
    arrays = make_inputs(rng, 2, 37, 1, 2, 3, 2, "strong")
    o_np, s_np = dplr.kda(*arrays[:5], initial_state=arrays[5], output_final_state=True,
                          chunk_size=4)  # fmt: skip
    o_ref, s_ref = kda_recurrent(*arrays[:5], initial_state=arrays[5])
    tol = tolerance(np.float64, 37, 3, 2, 4, steepest(arrays[3]))
    assert rel_err(o_np, o_ref) < tol and rel_err(s_np, s_ref) < tol
    inputs = dict(zip(GRAD_NAMES, _torch(*arrays, grad=True), strict=True))
    _check_gradients(inputs, 4)


@needs_torch
def test_gradcheck():
    rng = np.random.default_rng(14)
    arrays = make_inputs(rng, 1, 7, 1, 2, 2, 2, "strong")
    inputs = _torch(*arrays, grad=True)

    def fn(q, k, v, g, beta, s0):
        return dplr.kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=4)

    # fast_mode checks random projections of the Jacobian (the full one is
    # compared entry by entry against autograd through the recurrence above).
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backward_has_no_nan_at_any_decay(dtype):
    dtype = getattr(torch, dtype)
    rng = np.random.default_rng(15)
    q, k, v, g, beta, s0 = make_inputs(rng, 1, 40, 1, 2, 4, 3)
    g = np.full(g.shape, -5.0)
    g[:, :, :, 1] = -np.inf
    g[:, 10:20, :, 2] = -1000.0
    g[:, :, 1, 3] = 0.0
    inputs = _torch(q, k, v, g, beta, s0, dtype=dtype, grad=True)
    o, sn = dplr.kda(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    (o.sum() + sn.sum()).backward()
    for name, x in zip(GRAD_NAMES, inputs, strict=True):
        assert torch.isfinite(x.grad).all(), name
    # An exact reset: nothing flows back through a channel whose decay is -inf.
    assert (inputs[3].grad[:, :, :, 1] == 0).all()


@needs_torch
def test_backward_keeps_no_graph_of_the_chunk_loop():
    """The autograd graph has the same handful of nodes whatever the length."""

    def count_nodes(T):
        rng = np.random.default_rng(16)
        q, k, v, g, beta, s0 = _torch(*make_inputs(rng, 1, T, 1, 2, 4, 4), grad=True)
        o, sn = dplr.kda(q, k, v, g, beta, initial_state=s0, chunk_size=8,
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
