"""dplr.distributed: context parallelism against one process, on gloo process groups.

One set of 4 spawned processes (the spawn dominates the cost) runs every
case: the world of 4 ranks, a group of 2 ranks (1 and 3), failures.  Each
rank writes what it measured to a JSON file; the assertions run here.

References: a token-by-token recurrence under torch autograd written in this
file (independent of dplr), and dplr's single-process call on the whole
sequence (for KDA also checked against ``dplr.reference.kda_recurrent``).
Bound: float64, T <= 40 tokens of contractions; each token adds
O(K eps) relative error, so 1e-10 is far above honest rounding (~1e-15) and
far below any wrong fold or missing term (O(1)).
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dplr  # noqa: E402
import dplr.distributed  # noqa: E402
import dplr.reference  # noqa: E402

B, H, K, V = 2, 3, 4, 5
WORLD = 4
TOL64 = 1e-10
#: float32 inputs, maps kept in float32: O(T K eps32) with T = 13, K = 4.
TOL32 = 50 * 13 * 4 * 1.2e-7
FUNCTIONS = ("delta_rule", "gated_delta_rule", "kda")


# ---------------------------------------------------------------- the reference
def recurrence(q, k, v, beta, g, s0, scale, l2norm=False):
    """S_t = (I - beta_t k_t k_t^T) Diag(a_t) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t.

    ``a_t = exp(g_t)``: one decay per head (g of shape (B, T, HV)) or per key
    channel (g of shape (B, T, HV, K), KDA); none if g is None.  With HV value
    heads for H query/key heads, value head i reads key head i // (HV // H).
    """
    if l2norm:
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
    groups = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(groups, 2), k.repeat_interleave(groups, 2)
    state, outs = s0, []
    for t in range(q.shape[1]):
        if g is not None:
            decay = torch.exp(g[:, t])
            state = (decay[..., None] if g.ndim == 4 else decay[..., None, None]) * state
        kt = k[:, t, :, :, None]
        recall = kt.mT @ state
        state = state + beta[:, t, :, None, None] * kt * (v[:, t, :, None, :] - recall)
        outs.append(scale * (q[:, t, :, None, :] @ state)[..., 0, :])
    return torch.stack(outs, 1), state


def problem(total: int, dtype, seed: int = 0, hv: int = H, channels: bool = False) -> dict:
    """A random problem; ``channels``: KDA's per-channel g, strong (down to -5 per token)
    in key channels 0 and 1, mild in 2 and 3 (so that states cross the ranks), ``-inf``
    in a mild channel at tokens 2 and 9."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k = rand(B, total, H, K)
    if channels:
        g = torch.rand(B, total, hv, K, generator=gen, dtype=torch.float64)
        g = -g * torch.tensor([5.0, 5.0, 0.1, 0.1], dtype=torch.float64)
        g[0, 2 % total, 0, 2] = g[1, 9 % total, hv - 1, 3] = -torch.inf
    else:
        g = -0.3 * torch.rand(B, total, hv, generator=gen, dtype=torch.float64)
    return {
        "q": rand(B, total, H, K).to(dtype),
        "k": (k / k.norm(dim=-1, keepdim=True)).to(dtype),
        "v": rand(B, total, hv, V).to(dtype),
        "g": g.to(dtype),
        "beta": torch.rand(B, total, hv, generator=gen, dtype=torch.float64).to(dtype),
        "s0": rand(B, hv, K, V).to(dtype),
        "w": rand(B, total, hv, V).to(dtype),
        "wf": rand(B, hv, K, V).to(dtype),
    }


def names(fn: str) -> tuple[str, ...]:
    return ("q", "k", "v", "beta") if fn == "delta_rule" else ("q", "k", "v", "g", "beta")


def leaf(x):
    return x.detach().clone().requires_grad_()


def rel(a, b) -> float:
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().abs().max())


# ---------------------------------------------------------------- per rank
def compare(fn: str, lens, group, p: dict, *, with_s0: bool, options: dict) -> dict:
    """Errors of this rank's outputs, final state and gradients against both references."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, stop = sum(lens[:rank]), sum(lens[: rank + 1])
    keys = names(fn)
    whole = {n: leaf(p[n].double()) for n in (*keys, "s0")}
    gate = whole["g"] if "g" in whole else None
    s0 = whole["s0"] if with_s0 else None
    scale = options.get("scale") or K**-0.5
    o_ref, s_ref = recurrence(
        whole["q"],
        whole["k"],
        whole["v"],
        whole["beta"],
        gate,
        s0 if s0 is not None else torch.zeros_like(whole["s0"]),
        scale,
        options.get("use_qk_l2norm", False),
    )
    ((o_ref * p["w"].double()).sum() + (s_ref * p["wf"].double()).sum()).backward()
    single = getattr(dplr, fn)(
        *(p[n] for n in keys),
        initial_state=p["s0"] if with_s0 else None,
        output_final_state=True,
        **options,
    )

    mine = {n: leaf(p[n][:, start:stop]) for n in keys}
    my_s0 = leaf(p["s0"]) if with_s0 else None
    o, s = getattr(dplr.distributed, fn)(
        *(mine[n] for n in keys),
        initial_state=my_s0,
        output_final_state=True,
        group=group,
        **options,
    )
    # The loss of the whole sequence, split: each rank its outputs, the last rank the state.
    loss = (o * p["w"][:, start:stop]).sum()
    if rank == world - 1:
        loss = loss + (s * p["wf"]).sum()
    loss.backward()
    out = {
        "o": rel(o, o_ref[:, start:stop]),
        "o vs dplr": rel(o, single[0][:, start:stop]),
        "final": rel(s, s_ref),
        "final vs dplr": rel(s, single[1]),
        "dtype": str(o.dtype),
    }
    for n in keys:
        grad = mine[n].grad if mine[n].grad is not None else torch.zeros_like(mine[n])
        out[f"d{n}"] = rel(grad, whole[n].grad[:, start:stop])
    if fn == "kda":  # one process against the library's reference recurrence
        o_kda, s_kda = dplr.reference.kda_recurrent(
            *(p[n].double() for n in keys), initial_state=p["s0"].double() if with_s0 else None,
            **{n: x for n, x in options.items() if n != "chunk_size"},
        )  # fmt: skip
        out["one process vs kda_recurrent"] = rel(single[0], o_kda)
        out["one process final vs kda_recurrent"] = rel(single[1], s_kda)
    if with_s0:
        total = my_s0.grad.clone()
        dist.all_reduce(total, group=group)
        out["ds0 summed"] = rel(total, whole["s0"].grad)
    finals = [torch.empty_like(s) for _ in range(world)]
    dist.all_gather(finals, s.detach().contiguous(), group=group)
    out["final identical"] = all(bool(torch.equal(f, finals[0])) for f in finals)
    return out


def caught(call) -> dict:
    try:
        call()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def worker(rank: int, store: str, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    results: dict = {}
    try:
        pair = dist.new_group([1, 3])
        lens = [7, 0, 12, 5]  # uneven, one empty slice
        p = problem(sum(lens), torch.float64)
        for fn in FUNCTIONS[:2]:
            results[f"world {fn}"] = compare(fn, lens, None, p, with_s0=True, options={})
        pk = problem(sum(lens), torch.float64, seed=5, hv=2 * H, channels=True)
        results["world kda"] = compare("kda", lens, None, pk, with_s0=True, options={})
        grouped = problem(sum(lens), torch.float64, seed=4, hv=2 * H)
        results["world gated, 2 value heads per key head"] = compare(
            "gated_delta_rule", lens, None, grouped, with_s0=True, options={}
        )
        if rank in (1, 3):
            p2 = problem(13, torch.float64, seed=1)
            opts = {"scale": 0.7, "use_qk_l2norm": True, "chunk_size": 4}
            results["pair gated, no s0, l2norm"] = compare(
                "gated_delta_rule", [9, 4], pair, p2, with_s0=False, options=opts
            )
            p3 = problem(13, torch.float32, seed=2)
            results["pair delta float32"] = compare(
                "delta_rule", [6, 7], pair, p3, with_s0=True, options={}
            )
            p4 = problem(13, torch.float64, seed=6, channels=True)
            results["pair kda, no s0, l2norm"] = compare(
                "kda", [4, 9], pair, p4, with_s0=False, options=opts
            )
        # Rank 2 passes values of the wrong shape: every rank must raise, none wait.
        mine = problem(3, torch.float64, seed=3)
        v = mine["v"][:, :-1] if rank == 2 else mine["v"]  # one token short
        results["bad shape"] = caught(
            lambda: dplr.distributed.delta_rule(mine["q"], mine["k"], v, mine["beta"])
        )
        # Rank 3 passes another scale: every rank must refuse.
        scale = 0.5 if rank == 3 else None
        results["mismatch"] = caught(
            lambda: dplr.distributed.delta_rule(
                mine["q"], mine["k"], mine["v"], mine["beta"], scale=scale
            )
        )
        results["cu_seqlens"] = caught(
            lambda: dplr.distributed.delta_rule(
                mine["q"], mine["k"], mine["v"], mine["beta"], cu_seqlens=torch.tensor([0, 3])
            )
        )
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(outdir, f"{rank}.json"), "w") as fh:
            json.dump(results, fh)
        dist.destroy_process_group()


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run :func:`worker` on 4 gloo processes; each rank's results (fails if any hangs)."""
    import torch.multiprocessing as mp

    outdir = tmp_path_factory.mktemp("context")
    for dtype in (torch.float32, torch.float64):  # compile (or load) the kernels once, here
        p = {n: leaf(x) for n, x in problem(4, dtype).items()}
        o, _ = dplr.gated_delta_rule(
            p["q"], p["k"], p["v"], p["g"], p["beta"], initial_state=p["s0"]
        )
        o.sum().backward()
        c = {n: leaf(x) for n, x in problem(4, dtype, channels=True).items()}
        o, _ = dplr.kda(c["q"], c["k"], c["v"], c["g"], c["beta"], initial_state=c["s0"])
        o.sum().backward()
    ctx = mp.start_processes(
        worker,
        args=(str(outdir / "store"), str(outdir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 600  # spawn and imports are slow on a loaded machine
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the ranks did not finish within 600 s (a collective hung)")
    results = [json.loads((outdir / f"{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


def check_errors(res: dict, tol: float) -> None:
    for name, value in res.items():
        if name == "dtype":
            continue
        if name == "final identical":
            assert value, "the final state differs between ranks"
        else:
            assert value <= tol, f"{name}: relative error {value:.2e} > {tol:.0e}"


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_world_of_four_matches_one_process(ranks, fn):
    for r, res in enumerate(ranks):
        case = res[f"world {fn}"]
        assert case["dtype"] == "torch.float64", r
        check_errors(case, TOL64)


def test_grouped_value_heads(ranks):
    for res in ranks:
        check_errors(res["world gated, 2 value heads per key head"], TOL64)


def test_group_of_two_ranks(ranks):
    for r in (1, 3):
        check_errors(ranks[r]["pair gated, no s0, l2norm"], TOL64)
        check_errors(ranks[r]["pair kda, no s0, l2norm"], TOL64)
        case = ranks[r]["pair delta float32"]
        assert case["dtype"] == "torch.float32"
        check_errors(case, TOL32)
    for r in (0, 2):
        assert "pair delta float32" not in ranks[r]


def test_a_raising_rank_stops_every_rank(ranks):
    for r, res in enumerate(ranks):
        err = res["bad shape"]
        if r == 2:
            assert err["type"] == "ValueError" and "'v'" in err["message"], err
        else:
            assert err["type"] == "RuntimeError" and "[2]" in err["message"], err


def test_ranks_that_disagree_all_refuse(ranks):
    for res in ranks:
        err = res["mismatch"]
        assert err["type"] == "ValueError" and "scale" in err["message"], err


def test_cu_seqlens_is_refused_on_every_rank(ranks):
    for r, res in enumerate(ranks):
        err = res["cu_seqlens"]
        assert err["type"] == "ValueError" and "'cu_seqlens'" in err["message"], (r, err)


def test_clear_error_without_process_group():
    assert not dist.is_initialized()
    q = torch.zeros(1, 2, 1, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dplr.distributed.delta_rule(q, q, q, torch.zeros(1, 2, 1))


def test_subnormals_are_flushed_inside_the_pass_only():
    """The slice's pass (forward and backward) runs with subnormals flushed on this thread
    and dplr's workers, then the setting is restored (where the CPU cannot, nothing changes)."""
    from dplr.distributed import context

    supported = torch.set_flush_denormal(False)
    assert not context._flushing()
    seen = []

    def run(x):
        seen.append(context._flushing())
        seen.extend(context._on_every_worker(context._flushing))  # dplr's threads too
        x.register_hook(lambda grad: seen.append(context._flushing()))
        return x * 2.0, x.sum()[None]

    x = torch.ones(3, requires_grad=True)
    a, b = context._without_subnormals(run, x)
    assert not context._flushing()
    (a.sum() + 5.0 * b.sum()).backward()
    workers = dplr._runtime.threads.pool()._max_workers
    # forward (this thread, then each worker), then the backward reaching x
    assert seen == [supported] * (2 + workers)
    assert not context._flushing()
    assert not any(context._on_every_worker(context._flushing))
    assert torch.equal(x.grad, torch.full((3,), 7.0))
