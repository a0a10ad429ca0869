"""The compiled token recurrence (decode steps, short blocks) against the definition.

The reference below is the recurrence written out in float64, one token and
one head at a time, with per-channel decay and grouped value heads:

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

Tolerances: each output and state entry is a sum of K + V rounded products
with unit-norm keys, beta in [0, 1] and decays <= 1, so every step is a
contraction and the rounding errors of successive tokens add without
growing: ``10 (K + V) T eps`` relative to the largest entry bounds them
(a wrong sign, decay or head mapping is O(1) off).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dplr
from dplr._runtime import tuning
from dplr._runtime.tuning import RECURRENT_MAX_T
from dplr.attention import _recurrent, delta
from dplr.attention._recurrent import recurrent_forward

try:
    import torch
except ImportError:  # torch is optional: the torch tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def reference(q, k, v, beta, g=None, *, scale=None, s0=None, cu=None, l2norm=False):
    """Outputs (B, T, HV, V) and final states (N, HV, K, V), token by token in float64.

    g: (B, T, HV) per head, (B, T, HV, K) per channel, or None.
    """
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    if g is None:
        g = np.zeros((B, T, HV, K))
    g = np.asarray(g, np.float64)
    if g.ndim == 3:
        g = np.repeat(g[..., None], K, axis=-1)
    if l2norm:
        q = q / np.sqrt(np.maximum((q * q).sum(-1, keepdims=True), np.finfo(float).tiny))
        k = k / np.sqrt(np.maximum((k * k).sum(-1, keepdims=True), np.finfo(float).tiny))
    scale = K**-0.5 if scale is None else scale
    if cu is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, int(a), int(e)) for a, e in itertools.pairwise(cu)]
    o = np.zeros((B, T, HV, V))
    states = np.zeros((len(spans), HV, K, V))
    for n, (b, start, stop) in enumerate(spans):
        for h in range(HV):
            hk = h // (HV // H)
            S = np.zeros((K, V)) if s0 is None else np.array(s0[n, h], np.float64)
            for t in range(start, stop):
                kt = k[b, t, hk]
                S = np.exp(g[b, t, h])[:, None] * S
                S = (
                    S
                    - beta[b, t, h] * np.outer(kt, kt @ S)
                    + beta[b, t, h] * np.outer(kt, v[b, t, h])
                )
                o[b, t, h] = scale * (q[b, t, hk] @ S)
            states[n, h] = S
    return o, states


def inputs(rng, B, T, H, K, V, *, HV=None, dtype=np.float64, per_channel=False, g_scale=1.0):
    """Unit-norm keys, beta in (0, 1), log decays in [-g_scale, 0], an O(1) initial state."""
    HV = H if HV is None else HV
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V))
    beta = rng.uniform(0, 1, (B, T, HV))
    g = -g_scale * rng.uniform(0, 1, (B, T, HV, K) if per_channel else (B, T, HV))
    s0 = rng.standard_normal((B, HV, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, beta, g, s0))


def rel_err(actual, expected) -> float:
    a = np.asarray(actual.detach() if hasattr(actual, "detach") else actual, np.float64)
    return np.abs(a - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1.0)


def bound(dtype, T: int, K: int, V: int) -> float:
    return 10 * (K + V) * max(T, 1) * float(np.finfo(dtype).eps)


# ---------------------------------------------------------------- the public API
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 2, 7, RECURRENT_MAX_T])
@pytest.mark.parametrize("gated", [False, True])
def test_public_rules_match_recurrence(rng, dtype, T, gated):
    q, k, v, beta, g, s0 = inputs(rng, 2, T, 3, 8, 5, dtype=dtype)
    kw = {"initial_state": s0, "output_final_state": True}
    if gated:
        o, s = dplr.gated_delta_rule(q, k, v, g, beta, **kw)
    else:
        o, s = dplr.delta_rule(q, k, v, beta, **kw)
        g = None
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0)
    assert o.dtype == dtype and s.dtype == dtype
    assert rel_err(o, o_ref) < bound(dtype, T, 8, 5)
    assert rel_err(s, s_ref) < bound(dtype, T, 8, 5)


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_value_heads(rng, groups):
    """HV = groups * H: value head i reads key head i // groups."""
    q, k, v, beta, g, s0 = inputs(rng, 2, 5, 2, 6, 4, HV=2 * groups)
    o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0)
    assert rel_err(o, o_ref) < bound(np.float64, 5, 6, 4)
    assert rel_err(s, s_ref) < bound(np.float64, 5, 6, 4)


def test_options_scale_l2norm_no_state(rng):
    q, k, v, beta, g, _ = inputs(rng, 1, 5, 2, 6, 4)
    k = 3.0 * k  # l2norm must undo this
    k[0, 2, 1] = 0.0  # a zero key stays zero
    o, s = dplr.gated_delta_rule(q, k, v, g, beta, scale=0.3, use_qk_l2norm=True,
                                 output_final_state=True)  # fmt: skip
    o_ref, s_ref = reference(q, k, v, beta, g, scale=0.3, l2norm=True)
    assert rel_err(o, o_ref) < bound(np.float64, 5, 6, 4)
    assert rel_err(s, s_ref) < bound(np.float64, 5, 6, 4)
    none = dplr.gated_delta_rule(q, k, v, g, beta, scale=0.3, use_qk_l2norm=True)[1]
    assert none is None


def test_cu_seqlens_with_empty_sequences(rng):
    cu = np.array([0, 3, 3, 4, 9, 9])
    q, k, v, beta, g, _ = inputs(rng, 1, 9, 2, 4, 3)
    s0 = rng.standard_normal((5, 2, 4, 3))
    o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu,
                                 output_final_state=True)  # fmt: skip
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0, cu=cu)
    assert rel_err(o, o_ref) < bound(np.float64, 9, 4, 3)
    assert rel_err(s, s_ref) < bound(np.float64, 9, 4, 3)
    np.testing.assert_array_equal(s[1], s0[1])  # an empty sequence keeps its state


def test_inputs_are_not_modified(rng):
    args = inputs(rng, 1, 3, 2, 4, 4)
    copies = [x.copy() for x in args]
    q, k, v, beta, g, s0 = args
    dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    for x, x0 in zip(args, copies, strict=True):
        np.testing.assert_array_equal(x, x0)


def test_strong_decay_and_resets(rng):
    """g = -50 wipes the state (a = 2e-22): the output is the fresh write alone."""
    q, k, v, beta, g, s0 = inputs(rng, 1, 4, 2, 5, 3, g_scale=50.0)
    g[0, 2] = -50.0
    o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=1e3 * s0, output_final_state=True)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=1e3 * s0)
    assert rel_err(o, o_ref) < bound(np.float64, 4, 5, 3) * 1e3
    assert rel_err(s, s_ref) < bound(np.float64, 4, 5, 3) * 1e3


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 12), H=st.integers(1, 3), group=st.integers(1, 3), K=st.integers(1, 9),
    V=st.integers(1, 9), per_channel=st.booleans(), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_kernel_grouped_heads_and_channel_decay(T, H, group, K, V, per_channel, seed):
    """The kernel directly: HV = group * H value heads, one decay per channel or per head."""
    rng = np.random.default_rng(seed)
    q, k, v, beta, g, s0 = inputs(rng, 2, T, H, K, V, HV=group * H, per_channel=per_channel)
    if per_channel and K > 1:
        g[..., 0] = -np.inf  # channel 0 forgets everything at every token
    o, s = recurrent_forward(False, q, k, v, beta, g, s0, None, 0.7, False)
    o_ref, s_ref = reference(q, k, v, beta, g, scale=0.7, s0=s0)
    assert rel_err(o, o_ref) < bound(np.float64, T, K, V)
    assert rel_err(s, s_ref) < bound(np.float64, T, K, V)


# ------------------------------------------------------------------- the choice
def count_calls(monkeypatch) -> list[int]:
    """Calls of the recurrence, by the general path or the direct one."""
    calls: list[int] = []
    original = _recurrent.recurrent_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(delta, "recurrent_forward", spy)
    monkeypatch.setattr(_recurrent, "recurrent_forward", spy)
    return calls


def test_choice_by_length_and_chunk_size(rng, monkeypatch):
    calls = count_calls(monkeypatch)
    T = RECURRENT_MAX_T + 1
    q, k, v, beta, g, _ = inputs(rng, 1, T, 1, 4, 4)
    dplr.gated_delta_rule(q[:, :RECURRENT_MAX_T], k[:, :RECURRENT_MAX_T], v[:, :RECURRENT_MAX_T],
                          g[:, :RECURRENT_MAX_T], beta[:, :RECURRENT_MAX_T])  # fmt: skip
    assert len(calls) == 1
    dplr.gated_delta_rule(q, k, v, g, beta)  # longer: chunked
    dplr.gated_delta_rule(q[:, :2], k[:, :2], v[:, :2], g[:, :2], beta[:, :2], chunk_size=8)
    assert len(calls) == 1
    cu = np.array([0, 0, T])  # the longest packed sequence decides
    dplr.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)
    assert len(calls) == 1


@pytest.mark.parametrize("rule", ["delta", "gated", "kda"])
def test_method_chooses_either_algorithm_at_any_length(rng, monkeypatch, rule):
    """method="recurrent" above the automatic length, method="chunked" below it:
    both against the reference recurrence, and the spy sees which one ran."""
    calls = count_calls(monkeypatch)
    long, short = 2 * RECURRENT_MAX_T + 3, 2
    q, k, v, beta, g, s0 = inputs(rng, 2, long, 2, 6, 5, HV=4, per_channel=rule == "kda")
    fn = {"delta": lambda *a, **kw: dplr.delta_rule(*a[:3], a[4], **kw),
          "gated": dplr.gated_delta_rule, "kda": dplr.kda}[rule]  # fmt: skip
    g_ref = None if rule == "delta" else g
    for T, method, expected_calls in ((long, "recurrent", 1), (short, "chunked", 1)):
        args = (q[:, :T], k[:, :T], v[:, :T], g[:, :T], beta[:, :T])
        o, s = fn(*args, initial_state=s0, output_final_state=True, method=method)
        o_ref, s_ref = reference(*args[:3], args[4], None if g_ref is None else args[3], s0=s0)
        assert len(calls) == expected_calls, method
        assert rel_err(o, o_ref) < bound(np.float64, T, 6, 5)
        assert rel_err(s, s_ref) < bound(np.float64, T, 6, 5)


def test_method_errors(rng):
    q, k, v, beta, g, _ = inputs(rng, 1, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="'method' must be one of"):
        dplr.gated_delta_rule(q, k, v, g, beta, method="fast")
    with pytest.raises(ValueError, match="chunk_size only with 'chunked'"):
        dplr.gated_delta_rule(q, k, v, g, beta, method="recurrent", chunk_size=8)
    if torch is not None:
        qt, kt, vt, bt, gt = (torch.from_numpy(x) for x in (q, k, v, beta, g))
        qt.requires_grad_(True)
        with pytest.raises(ValueError, match="forward only"):
            dplr.gated_delta_rule(qt, kt, vt, gt, bt, method="recurrent")
        with torch.no_grad():  # no gradient needed: it runs
            o, _ = dplr.gated_delta_rule(qt, kt, vt, gt, bt, method="recurrent")
        assert rel_err(o, reference(q, k, v, beta, g)[0]) < bound(np.float64, 3, 4, 4)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_without_and_with_gradients(rng, monkeypatch, dtype):
    calls = count_calls(monkeypatch)
    arrays = inputs(rng, 2, 3, 2, 8, 4, dtype=np.dtype(dtype))
    q, k, v, beta, g, s0 = (torch.from_numpy(x) for x in arrays)
    with torch.no_grad():
        o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert len(calls) == 1 and isinstance(o, torch.Tensor) and o.dtype == q.dtype
    o_ref, s_ref = reference(*arrays[:5], s0=arrays[5])
    assert rel_err(o, o_ref) < bound(np.dtype(dtype), 3, 8, 4)
    assert rel_err(s, s_ref) < bound(np.dtype(dtype), 3, 8, 4)
    q.requires_grad_(True)  # gradients need the chunked algorithm
    o, _ = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert len(calls) == 1 and o.requires_grad
    assert rel_err(o, o_ref) < bound(np.dtype(dtype), 3, 8, 4) * 10


@needs_torch
def test_torch_half_precision_and_strided(rng):
    q, k, v, beta, g, s0 = (torch.from_numpy(x) for x in inputs(rng, 1, 4, 2, 8, 8))
    o, _ = dplr.gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta)
    assert o.dtype == torch.float64  # promoted with the float64 g and beta
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    o1, _ = dplr.gated_delta_rule(qt, k, v, g, beta, initial_state=s0)
    o2, _ = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert torch.equal(o1, o2)


def test_parallel_lanes_match_one_thread(rng, monkeypatch):
    """Lanes split over threads give the same bits as one thread."""
    q, k, v, beta, g, s0 = inputs(rng, 3, 4, 4, 8, 8)
    one = recurrent_forward(False, q, k, v, beta, g, s0, None, 0.5, True)
    monkeypatch.setattr(tuning, "RECURRENT_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(_recurrent, "num_workers", lambda: 3)
    split = recurrent_forward(False, q, k, v, beta, g, s0, None, 0.5, True)
    for a, b in zip(one, split, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ the direct entry
def direct_calls(monkeypatch) -> list[bool]:
    """Whether each call of the direct entry ran the recurrence (True) or declined."""
    taken: list[bool] = []
    original = _recurrent.recurrent_direct

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(delta, "recurrent_direct", spy)
    return taken


@pytest.mark.parametrize("library", ["numpy", pytest.param("torch", marks=needs_torch)])
@pytest.mark.parametrize("rule", ["delta", "gated", "kda"])
def test_direct_entry_gives_the_general_paths_bits(rng, monkeypatch, library, rule):
    """A decode-shaped call runs directly and matches the general path bit for bit."""
    taken = direct_calls(monkeypatch)
    q, k, v, beta, g, s0 = inputs(rng, 2, 3, 2, 8, 4, HV=4, dtype=np.float32,
                                  per_channel=rule == "kda")  # fmt: skip
    if library == "torch":
        q, k, v, beta, g, s0 = (torch.from_numpy(x) for x in (q, k, v, beta, g, s0))

    def run(**options):
        common = dict(initial_state=s0, output_final_state=True, use_qk_l2norm=True, **options)
        if rule == "delta":
            return dplr.delta_rule(q, k, v, beta, **common)
        if rule == "gated":
            return dplr.gated_delta_rule(q, k, v, g, beta, **common)
        return dplr.kda(q, k, v, g, beta, **common)

    direct = run(scale=0.3)
    assert taken == [True]
    general = run(scale=np.float32(0.3))  # a NumPy scalar takes the general path
    assert taken == [True, False]
    for a, b in zip(direct, general, strict=True):
        assert type(a) is type(b) and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["q", "k", "v", "beta", "g", "initial_state"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_direct_entry_names_a_bad_value(rng, monkeypatch, name, bad):
    """A NaN or Inf anywhere (or a positive log decay) gets the general path's error."""
    taken = direct_calls(monkeypatch)
    arrays = dict(zip(["q", "k", "v", "beta", "g", "initial_state"],
                      inputs(rng, 1, 2, 2, 8, 8, HV=4), strict=True))  # fmt: skip
    if name == "g" and bad == -np.inf:
        bad = 0.5  # -Inf is a valid log decay (a reset); a positive one is not
    index = tuple(int(rng.integers(0, n)) for n in arrays[name].shape)
    kept = {key: x.copy() for key, x in arrays.items()}
    arrays[name][index] = bad
    with pytest.raises(ValueError, match=f"'{name}'"):
        dplr.gated_delta_rule(arrays["q"], arrays["k"], arrays["v"], arrays["g"],
                              arrays["beta"], initial_state=arrays["initial_state"])  # fmt: skip
    assert taken == [False]  # the loop ran, found the value, and handed over
    for key, x in kept.items():  # nothing of the caller's was written
        if key != name:
            np.testing.assert_array_equal(arrays[key], x)


def test_direct_entry_allows_a_reset(rng, monkeypatch):
    """g = -Inf (a decay factor of exactly 0) runs directly and forgets the state."""
    taken = direct_calls(monkeypatch)
    q, k, v, beta, g, s0 = inputs(rng, 1, 2, 1, 4, 4)
    g[0, 0, 0] = -np.inf
    o, s = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert taken == [True]
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0)
    assert rel_err(o, o_ref) < bound(np.float64, 2, 4, 4)
    assert rel_err(s, s_ref) < bound(np.float64, 2, 4, 4)


@pytest.mark.parametrize("case", ["strided", "float16", "mixed dtypes", "integer scale",
                                  "cu_seqlens", "empty axis", "long", "list",
                                  "no value heads"])  # fmt: skip
def test_direct_entry_declines_other_arguments(rng, monkeypatch, case):
    """Anything but clean same-dtype contiguous arrays of decode length takes the general path."""
    taken = direct_calls(monkeypatch)
    q, k, v, beta, g, s0 = inputs(rng, 1, 3, 2, 8, 8, dtype=np.float32)
    options = {}
    if case == "strided":
        v = np.asfortranarray(v)
    elif case == "float16":
        q = q.astype(np.float16)
    elif case == "mixed dtypes":
        beta = beta.astype(np.float64)
    elif case == "integer scale":
        options["scale"] = 1
    elif case == "cu_seqlens":
        options["cu_seqlens"] = np.array([0, 1, 3])
        s0 = None
    elif case == "empty axis":
        q, k, s0 = q[..., :0], k[..., :0], s0[:, :, :0]
    elif case == "long":
        q, k, v, beta, g, s0 = inputs(rng, 1, RECURRENT_MAX_T + 1, 2, 8, 8, dtype=np.float32)
    elif case == "list":
        beta = beta.tolist()
    if case == "no value heads":  # not a multiple of H: the general entry names v
        v, beta, g, s0 = v[:, :, :0], beta[:, :, :0], g[:, :, :0], s0[:, :0]
        with pytest.raises(ValueError, match="'v' must have shape"):
            dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    else:
        dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, **options)
    assert True not in taken  # declined, or (cu_seqlens) not asked


def test_decode_steps_from_several_threads_at_once(rng):
    """Threads stepping their own states at the same time get the results of running alone."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [inputs(rng, 1, 1, 4, 16, 16, dtype=np.float32) for _ in range(8)]

    def step(arrays):
        q, k, v, beta, g, s0 = arrays
        state = s0
        outputs = []
        for _ in range(20):  # the same token again and again: the state keeps changing
            o, state = dplr.gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                             output_final_state=True)  # fmt: skip
            outputs.append(o)
        return np.stack(outputs), state

    alone = [step(p) for p in problems]
    with ThreadPoolExecutor(4) as executor:
        together = list(executor.map(step, problems))
    for (o1, s1), (o2, s2) in zip(alone, together, strict=True):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("rule", ["gated", "kda"])
def test_decode_steps_at_the_model_head_size(rng, rule):
    """200 decode steps at K = V = 128, float32, each step's state fed to the next
    (the direct entry), gates down to -5: the float64 recurrence over the whole
    sequence, within the float32 bound."""
    T, H, HV, K, V = 200, 2, 4, 128, 128
    q, k, v, beta, g, s0 = inputs(rng, 1, T, H, K, V, HV=HV, per_channel=rule == "kda",
                                  g_scale=5.0)  # fmt: skip
    fn = dplr.kda if rule == "kda" else dplr.gated_delta_rule
    state, outputs = s0.astype(np.float32), []
    for t in range(T):
        token = (x[:, t : t + 1].astype(np.float32) for x in (q, k, v, g, beta))
        o, state = fn(*token, initial_state=state, output_final_state=True)
        outputs.append(o)
    o_ref, s_ref = reference(q, k, v, beta, g, s0=s0)
    assert state.dtype == np.float32
    assert rel_err(np.concatenate(outputs, axis=1), o_ref) < bound(np.float32, T, K, V)
    assert rel_err(state, s_ref) < bound(np.float32, T, K, V)
