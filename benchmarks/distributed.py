"""Beyond one process: context parallelism on 2 gloo ranks, batched Cholesky on 2 Dask workers.

Every process and worker runs one thread (the machine has 2 cores):

- gated delta rule and KDA, float32, B = 1, K = V = 64, forward (and
  forward + backward), against the single-process call in the same
  processes, timed in alternation: weak scaling (T tokens per rank: 1 rank,
  2 ranks) and strong scaling (2 T tokens in one process against T on each
  of 2 ranks).  Errors: the forward's outputs and final state against the
  reference recurrence of ``dplr.reference`` in float64 at the timed size;
  the gradients against torch autograd through that recurrence at a smaller
  T (the recurrence under autograd is slow), said in the row;
- Dask: a batch of rank-1 updates of 32 x 32 factors kept on the workers,
  one worker process against two.

Run ``python -m dplr_bench.distributed`` or ``python -m dplr bench --suite
distributed`` (not ``python benchmarks/distributed.py``: as a script, this
file's name would hide the ``distributed`` package).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

try:
    from ._common import Progress, Row, by_mode, format_table, noop_progress, rel_error
except ImportError:  # run as a script
    from _common import Progress, Row, by_mode, format_table, noop_progress, rel_error

SUITE = "distributed"
K = V = 64


# ---------------------------------------------------------------- context parallelism
#: The rules timed: dplr's function name, its label, and its reference recurrence's name.
RULES = {"gated_delta_rule": ("gated delta rule", "gated_delta_rule_recurrent"),
         "kda": ("KDA", "kda_recurrent")}  # fmt: skip


def _inputs(torch, T: int, heads: int, rule: str, seed: int = 0) -> list:
    """float32 q, k, v, g, beta: unit keys, g in [-0.1, 0] per head (per key channel for KDA)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, heads, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, heads, K, generator=gen), dim=-1)
    v = torch.randn(1, T, heads, V, generator=gen)
    g = -0.1 * torch.rand(1, T, heads, *((K,) if rule == "kda" else ()), generator=gen)
    beta = torch.rand(1, T, heads, generator=gen)
    return [q, k, v, g, beta]


def _forward_errors(torch, dist, rule: str, T: int, heads: int, rank: int, solo) -> list[float]:
    """Relative errors of the 1-rank and 2-rank calls (outputs and final state, float32)
    against the reference recurrence in float64, computed without dplr's kernels."""
    import dplr.distributed as dd
    import dplr.reference

    reference = getattr(dplr.reference, RULES[rule][1])
    call = getattr(dd, rule)
    whole = _inputs(torch, 2 * T, heads, rule)
    mine = [x[:, rank * T : (rank + 1) * T] for x in whole]
    with torch.no_grad():
        o, s = call(*mine, output_final_state=True)
        o_ref, s_ref = reference(*(x.double() for x in whole))
        errors = [0.0, max(_rel(o, o_ref[:, rank * T : (rank + 1) * T]), _rel(s, s_ref))]
        if rank == 0:
            half = [x[:, :T] for x in whole]
            o, s = call(*half, output_final_state=True, group=solo)
            o_ref, s_ref = reference(*(x.double() for x in half))
            errors[0] = max(_rel(o, o_ref), _rel(s, s_ref))
    out = torch.tensor(errors, dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.tolist()


def _gradient_error(torch, dist, rule: str, T: int, heads: int, rank: int) -> float:
    """Largest relative error of the 2-rank gradients (float32) of q, k, v, g, beta against
    torch autograd through the reference recurrence in float64, at T tokens per rank."""
    import dplr.distributed as dd
    import dplr.reference

    whole = _inputs(torch, 2 * T, heads, rule, seed=1)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(1, 2 * T, heads, V, generator=gen)
    wf = torch.randn(1, heads, K, V, generator=gen)
    mine = [x[:, rank * T : (rank + 1) * T].clone().requires_grad_() for x in whole]
    o, s = getattr(dd, rule)(*mine, output_final_state=True)
    loss = (o * w[:, rank * T : (rank + 1) * T]).sum() + (s * wf).sum() * (rank == 0)
    grads = torch.autograd.grad(loss, mine)
    exact = [x.double().requires_grad_() for x in whole]
    o_ref, s_ref = getattr(dplr.reference, RULES[rule][1])(*exact)
    exact_grads = torch.autograd.grad((o_ref * w).sum() + (s_ref * wf).sum(), exact)
    mine_exact = [x[:, rank * T : (rank + 1) * T] for x in exact_grads]
    err = max(_rel(a, b) for a, b in zip(grads, mine_exact, strict=True))
    out = torch.tensor([err], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out)


def _rank_main(rank: int, store: str, out: str, T: int, heads: int, repeats: int,
               grad_T: int) -> None:  # fmt: skip
    """One of 2 ranks: time the cases of every rule in alternation; rank 0 writes the medians."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    solo = dist.new_group([0])
    import dplr
    import dplr.distributed as dd

    results = {}
    for rule in RULES:
        whole = _inputs(torch, 2 * T, heads, rule)
        mine = [x[:, rank * T : (rank + 1) * T].contiguous() for x in whole]
        half = [x[:, :T].contiguous() for x in whole]

        def single(xs, rule=rule):
            return lambda: getattr(dplr, rule)(*xs, output_final_state=True)

        def spread(xs, group=None, rule=rule):
            return lambda: getattr(dd, rule)(*xs, output_final_state=True, group=group)

        def fwd_bwd(fn, xs):
            leaves = [x.detach().clone().requires_grad_() for x in xs]

            def run():
                o, s = fn(leaves)()
                torch.autograd.grad((o.sum() + s.sum(),), leaves)

            return run

        cases = {  # name: (function, which ranks run it)
            "single T": (single(half), (0,)),
            "1 rank T": (spread(half, solo), (0,)),
            "single 2T": (single(whole), (0,)),
            "2 ranks T each": (spread(mine), (0, 1)),
            "single 2T fwd+bwd": (fwd_bwd(single, whole), (0,)),
            "2 ranks fwd+bwd": (fwd_bwd(spread, mine), (0, 1)),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, (fn, ranks) in cases.items():
                dist.barrier()
                start = time.perf_counter()
                if rank in ranks:
                    fn()
                took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slowest rank ends the call
                if round_:
                    times[name].append(float(took))
        results[rule] = {
            "times": {name: statistics.median(t) for name, t in times.items()},
            "errors": _forward_errors(torch, dist, rule, T, heads, rank, solo),
            "grad error": _gradient_error(torch, dist, rule, grad_T, heads, rank),
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().abs().max())


def context_times(T: int, heads: int, repeats: int, grad_T: int) -> dict:
    """Per rule: median seconds of every case on 2 spawned gloo ranks (one thread each),
    and the errors against the reference recurrence."""
    import torch.multiprocessing as mp

    saved = os.environ.get("DPLR_NUM_THREADS")
    os.environ["DPLR_NUM_THREADS"] = "1"  # read by the children at import
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.json")
            args = (os.path.join(tmp, "store"), out, T, heads, repeats, grad_T)
            mp.start_processes(_rank_main, args=args, nprocs=2, start_method="spawn")
            return json.loads(Path(out).read_text())
    finally:
        if saved is None:
            del os.environ["DPLR_NUM_THREADS"]
        else:
            os.environ["DPLR_NUM_THREADS"] = saved


def context_rows(T: int, heads: int, repeats: int, grad_T: int) -> list[Row]:
    """Weak and strong scaling rows of every rule in :data:`RULES`."""
    rows: list[Row] = []
    for rule, res in context_times(T, heads, repeats, grad_T).items():
        label = RULES[rule][0]
        t, (err1, err2), grad_err = res["times"], res["errors"], res["grad error"]
        per_rank = f"B=1 H={heads} K=V={K}, T={T} per rank"
        total = f"B=1 H={heads} K=V={K}, T={2 * T} in all"
        extra = f"the K extra value columns: {t['1 rank T'] / t['single T']:.2f}x the plain pass"
        grads = (f"error: gradients at T={grad_T} per rank against autograd through the "
                 "float64 recurrence")  # fmt: skip
        rows += [
            Row(SUITE, f"{label}: weak scaling, 1 rank", per_rank, "single process, T tokens",
                t["single T"], t["1 rank T"], err1, None, extra,
                {"T": T, "ranks": 1, "rule": rule}),
            Row(SUITE, f"{label}: weak scaling, 2 ranks", per_rank, "single process, T tokens",
                t["single T"], t["2 ranks T each"], err2, None, "ideal 1x",
                {"T": T, "ranks": 2, "rule": rule}),
            Row(SUITE, f"{label}: strong scaling, 2 ranks", total, "single process, 2T tokens",
                t["single 2T"], t["2 ranks T each"], err2, None, "ideal 2x",
                {"T": 2 * T, "ranks": 2, "rule": rule}),
            Row(SUITE, f"{label}: strong scaling, 2 ranks, fwd+bwd", total,
                "single process, 2T tokens", t["single 2T fwd+bwd"], t["2 ranks fwd+bwd"],
                grad_err, None, f"ideal 2x; {grads}", {"T": 2 * T, "ranks": 2, "rule": rule}),
        ]  # fmt: skip
    return rows


# ---------------------------------------------------------------- Dask
def _factors(x):
    import numpy as np

    return np.linalg.cholesky(x @ x.mT / x.shape[-1] + np.eye(x.shape[-1]))


def dask_rows(count: int, n: int, repeats: int) -> list[Row]:
    """Rank-1 updates of ``count`` n x n factors on 1 worker process and on 2."""
    import logging

    import dask.array as da
    import numpy as np

    import distributed
    from dplr.distributed import dask as ddk

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        env=ddk.worker_env(1), silence_logs=logging.ERROR,
    )  # fmt: skip
    try:
        with distributed.Client(cluster) as client:
            first = sorted(client.scheduler_info()["workers"])[:1]
            rng = da.random.default_rng(0)
            x = rng.standard_normal((count, n, n), chunks=(count // 4, n, n))
            low = x.map_blocks(_factors)
            u = rng.standard_normal((count, n, 1), chunks=(count // 4, n, 1))
            on_one = client.persist([low, u], workers=first)
            on_two = client.persist([low, u])
            distributed.wait([*on_one, *on_two])
            client.rebalance()

            def run(operands, workers):
                result = client.persist(ddk.cholesky_update(*operands), workers=workers)
                distributed.wait(result)
                return result

            times: dict[str, list[float]] = {"one": [], "two": []}
            for round_ in range(repeats + 1):
                for name, ops, workers in (("one", on_one, first), ("two", on_two, None)):
                    start = time.perf_counter()
                    run(ops, workers)
                    if round_:
                        times[name].append(time.perf_counter() - start)
            a, b = run(on_one, first).compute(), run(on_two, None).compute()
            factor, vec = (x.compute() for x in on_two)
    finally:
        cluster.close()
    # Without dplr: refactorise L L^T + u u^T with LAPACK.
    err = rel_error(b, np.linalg.cholesky(factor @ factor.mT + vec @ vec.mT))
    same = "bitwise equal" if np.array_equal(a, b) else f"differ by {np.abs(a - b).max():.1e}"
    t1, t2 = (statistics.median(times[k]) for k in ("one", "two"))
    return [
        Row(SUITE, "Dask: batched rank-1 update, 2 workers", f"{count} x {n}x{n}, 4 blocks",
            "1 worker process (1 thread)", t1, t2, err, None,
            "2 worker processes x 1 thread; factors kept on the workers; error against "
            f"numpy.linalg.cholesky(L L^T + u u^T); the 1- and 2-worker results: {same}",
            {"count": count, "N": n}),
    ]  # fmt: skip


# ---------------------------------------------------------------- suite
def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """Benchmark rows; ``quick`` uses T = 512 per rank, 4 heads and 10^4 factors."""
    progress = progress or noop_progress
    rows: list[Row] = []
    try:
        import torch.distributed as dist

        have_torch = dist.is_available()
    except ImportError:
        have_torch = False
    if have_torch:
        progress("distributed: context parallelism on 2 gloo ranks")
        T, heads, repeats, grad_T = by_mode((4096, 8, 5, 256), (512, 4, 3, 128), (64, 2, 1, 16))
        rows += context_rows(T, heads, repeats, grad_T)
    else:
        progress("torch.distributed is not available: skipping the context-parallel rows")
    try:
        import dask.array  # noqa: F401

        import distributed  # noqa: F401
    except ImportError:
        progress("dask.distributed is not installed: skipping the Dask row")
        return rows
    progress("distributed: Dask, 1 worker process against 2")
    rows += dask_rows(by_mode(40_000, 10_000, 200), 32, by_mode(5, 3, 1))
    return rows


if __name__ == "__main__":
    _rows = run(progress=print)
    print(format_table(_rows))
