"""dplr.distributed._collective: the checks, the agreement and the prefix fold, in one process.

The collectives are replaced by stand-ins that hand each simulated rank what
the other ranks would send (``all_gather``) or record what it would sum
(``all_reduce``), so every rank of a world of 3 runs here without spawning
processes (tests/distributed/test_context.py runs real gloo groups).  The
reference of the fold is the recursion ``S_{j+1} = M_j S_j + E_j`` as a loop
under torch autograd.  Bound: float64, three 4 x 4 maps of norm ~1: 1e-12
relative is far above rounding and far below any wrong term.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from dplr.distributed import _collective as coll  # noqa: E402

B, H, K, V, WORLD = 2, 3, 4, 5, 3


def _inputs(T=6, hv=H, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=dtype),
        "k": torch.randn(B, T, H, K, generator=gen, dtype=dtype),
        "v": torch.randn(B, T, hv, V, generator=gen, dtype=dtype),
        "beta": torch.rand(B, T, hv, generator=gen, dtype=dtype),
    }


def test_require_group_without_a_process_group_says_what_to_call():
    if dist.is_available() and dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already up in this process")
    with pytest.raises(RuntimeError, match=r"dplr\.distributed\.delta_rule.*init_process_group"):
        coll.require_group("delta_rule", None)


def test_check_slice_names_the_argument_and_shape():
    good = _inputs()
    coll.check_slice(good, torch.zeros(B, H, K, V, dtype=torch.float64), None)
    coll.check_slice(_inputs(hv=2 * H), None, None)  # grouped value heads
    with pytest.raises(ValueError, match="cu_seqlens"):
        coll.check_slice(good, None, torch.tensor([0, 6]))
    with pytest.raises(TypeError, match=r"'k' must be a torch\.Tensor"):
        coll.check_slice({**good, "k": good["k"].numpy()}, None, None)
    with pytest.raises(TypeError, match="'beta' must be a floating tensor"):
        coll.check_slice({**good, "beta": torch.ones(B, 6, H, dtype=torch.int64)}, None, None)
    with pytest.raises(ValueError, match=r"'q' must have shape \(B, T_r, H, K\)"):
        coll.check_slice({**good, "q": good["q"][0]}, None, None)
    with pytest.raises(ValueError, match=r"HV a multiple of H = 3; got shape \(2, 6, 4, 5\)"):
        coll.check_slice(_inputs(hv=4), None, None)
    with pytest.raises(ValueError, match=r"'initial_state' must have shape \(B, HV, K, V\)"):
        coll.check_slice(good, torch.zeros(B, H, V, K, dtype=torch.float64), None)


def test_describe_lists_every_field_in_order():
    x = _inputs(hv=2 * H, dtype=torch.float32)
    x["q"].requires_grad_()
    row = coll.describe(x, None, True, {"scale": 0.5, "chunk_size": 16})
    got = dict(zip(coll.FIELDS, row, strict=True))
    assert got == {
        "B": B, "H": H, "value heads": 2 * H, "K": K, "V": V,
        "dtype": coll._DTYPES.index("float32"), "initial_state given": False,
        "output_final_state": True, "requires grad": True, "use_qk_l2norm": False,
        "scale given": True, "scale": 0.5, "chunk_size": 16,
    }  # fmt: skip


def _fake_all_gather(rows_of_others):
    """An ``all_gather`` that fills the other ranks' parts with the given rows."""

    def all_gather(parts, mine, group=None):
        for r, part in enumerate(parts):
            part.copy_(mine if rows_of_others[r] is None else rows_of_others[r])

    return all_gather


def _row(meta, ok=True):
    return torch.tensor([1.0 if ok else 0.0, *meta], dtype=torch.float64)


def test_agree_raises_on_every_rank_for_a_failure_or_a_mismatch(monkeypatch):
    x = _inputs()
    meta = coll.describe(x, None, False, {})
    monkeypatch.setattr(coll, "_flag_device", lambda group, like: torch.device("cpu"))
    gather = "all_gather"
    # All agree: nothing happens.
    monkeypatch.setattr(dist, gather, _fake_all_gather([None, _row(meta), _row(meta)]))
    coll.agree("delta_rule", None, 0, WORLD, meta, None, x)
    # Rank 2 failed: ranks 0 and 1 stop too, naming it.
    monkeypatch.setattr(dist, gather, _fake_all_gather([None, _row(meta), _row(meta, ok=False)]))
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[2\] of 3 raised"):
        coll.agree("delta_rule", None, 0, WORLD, meta, None, x)
    # This rank failed: its own error is raised (after the exchange).
    with pytest.raises(KeyError):
        coll.agree("delta_rule", None, 0, WORLD, None, KeyError("mine"), x)
    # Rank 1 has another V: the field is named with every rank's value.
    other = list(meta)
    other[coll.FIELDS.index("V")] = V + 1
    monkeypatch.setattr(dist, gather, _fake_all_gather([None, _row(other), _row(meta)]))
    with pytest.raises(ValueError, match=r"'V' must be the same on every rank; got \[5.0, 6.0, 5"):
        coll.agree("delta_rule", None, 0, WORLD, meta, None, x)


def test_prefix_fold_and_its_gradient_over_a_simulated_world(monkeypatch):
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    maps = [0.5 * rand(B, H, K, V + K) for _ in range(WORLD)]
    s0 = rand(B, H, K, V)
    w_in = [rand(B, H, K, V) for _ in range(WORLD)]
    w_final = [rand(B, H, K, V) for _ in range(WORLD)]

    # Reference: the loop, and autograd of sum_r <W_r, S_r> + <Wf_r, S_world>.
    leaves = [m.clone().requires_grad_() for m in maps]
    s0_leaf = s0.clone().requires_grad_()
    states = [s0_leaf]
    for m in leaves:
        states.append(m[..., V:] @ states[-1] + m[..., :V])
    loss = sum((w_in[r] * states[r] + w_final[r] * states[WORLD]).sum() for r in range(WORLD))
    want = torch.autograd.grad(loss, [*leaves, s0_leaf])

    gathered = torch.stack(maps)
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(coll, "_all_gather", lambda x, group, world: gathered.clone())
    monkeypatch.setattr(coll, "_all_reduce", lambda x, group: reduced.append(x.clone()) or x)
    ds0 = torch.zeros_like(s0)
    for rank in range(WORLD):
        m = maps[rank].clone().requires_grad_()
        s = s0.clone().requires_grad_()
        s_in, s_final = coll.prefix_fold(m, s, None, rank, WORLD)
        assert torch.allclose(s_in, states[rank], rtol=0, atol=1e-12)
        assert torch.allclose(s_final, states[WORLD], rtol=0, atol=1e-12)
        ((w_in[rank] * s_in).sum() + (w_final[rank] * s_final).sum()).backward()
        ds0 += s.grad
    d_maps = sum(reduced)  # what the all-reduce sums; rank j keeps entry j
    for j in range(WORLD):
        assert torch.allclose(d_maps[j], want[j], rtol=0, atol=1e-12 * want[j].abs().max())
    assert torch.allclose(ds0, want[WORLD], rtol=0, atol=1e-12 * want[WORLD].abs().max())
