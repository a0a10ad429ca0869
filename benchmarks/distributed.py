"""Beyond one process: context parallelism on 2 gloo ranks, batched Cholesky on 2 Dask workers.

Every process and worker runs one thread (the machine has 2 cores):

- gated delta rule, float32, B = 1, K = V = 64, forward (and forward +
  backward), against the single-process call in the same processes, timed
  in alternation: weak scaling (T tokens per rank: 1 rank, 2 ranks) and
  strong scaling (2 T tokens in one process against T on each of 2 ranks);
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
    from ._common import Progress, Row, by_mode, format_table, noop_progress
except ImportError:  # run as a script
    from _common import Progress, Row, by_mode, format_table, noop_progress

SUITE = "distributed"
K = V = 64


# ---------------------------------------------------------------- context parallelism
def _inputs(torch, T: int, heads: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, heads, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, heads, K, generator=gen), dim=-1)
    v = torch.randn(1, T, heads, V, generator=gen)
    g = -0.1 * torch.rand(1, T, heads, generator=gen)
    beta = torch.rand(1, T, heads, generator=gen)
    return [x.requires_grad_(grad) for x in (q, k, v, g, beta)]


def _rank_main(rank: int, store: str, out: str, T: int, heads: int, repeats: int) -> None:
    """One of 2 ranks: time the cases in alternation; rank 0 writes the medians."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    solo = dist.new_group([0])
    import dplr
    import dplr.distributed as dd

    whole = _inputs(torch, 2 * T, heads, grad=False)
    mine = [x[:, rank * T : (rank + 1) * T].contiguous() for x in whole]
    half = [x[:, :T].contiguous() for x in whole]

    def single(xs):
        return lambda: dplr.gated_delta_rule(*xs, output_final_state=True)

    def spread(xs, group=None):
        return lambda: dd.gated_delta_rule(*xs, output_final_state=True, group=group)

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
    with torch.no_grad():
        o, s = dd.gated_delta_rule(*mine, output_final_state=True)
        o_ref, s_ref = dplr.gated_delta_rule(*whole, output_final_state=True)
    mine_ref = o_ref[:, rank * T : (rank + 1) * T]
    err = torch.tensor([max(_rel(o, mine_ref), _rel(s, s_ref))], dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
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
    if rank == 0:
        medians = {name: statistics.median(t) for name, t in times.items()}
        Path(out).write_text(json.dumps({"times": medians, "error": float(err)}))
    dist.destroy_process_group()


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def context_times(T: int, heads: int, repeats: int) -> dict:
    """Median seconds of every case on 2 spawned gloo ranks (one thread each)."""
    import torch.multiprocessing as mp

    saved = os.environ.get("DPLR_NUM_THREADS")
    os.environ["DPLR_NUM_THREADS"] = "1"  # read by the children at import
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.json")
            args = (os.path.join(tmp, "store"), out, T, heads, repeats)
            mp.start_processes(_rank_main, args=args, nprocs=2, start_method="spawn")
            return json.loads(Path(out).read_text())
    finally:
        if saved is None:
            del os.environ["DPLR_NUM_THREADS"]
        else:
            os.environ["DPLR_NUM_THREADS"] = saved


def context_rows(T: int, heads: int, repeats: int) -> list[Row]:
    res = context_times(T, heads, repeats)
    t, err = res["times"], res["error"]
    per_rank = f"B=1 H={heads} K=V={K}, T={T} per rank"
    total = f"B=1 H={heads} K=V={K}, T={2 * T} in all"
    extra = f"the K extra value columns: {t['1 rank T'] / t['single T']:.2f}x the plain pass"
    return [
        Row(SUITE, "weak scaling, 1 rank", per_rank, "single process, T tokens",
            t["single T"], t["1 rank T"], err, None, extra, {"T": T, "ranks": 1}),
        Row(SUITE, "weak scaling, 2 ranks", per_rank, "single process, T tokens",
            t["single T"], t["2 ranks T each"], err, None, "ideal 1x", {"T": T, "ranks": 2}),
        Row(SUITE, "strong scaling, 2 ranks", total, "single process, 2T tokens",
            t["single 2T"], t["2 ranks T each"], err, None, "ideal 2x",
            {"T": 2 * T, "ranks": 2}),
        Row(SUITE, "strong scaling, 2 ranks, fwd+bwd", total, "single process, 2T tokens",
            t["single 2T fwd+bwd"], t["2 ranks fwd+bwd"], err, None, "ideal 2x",
            {"T": 2 * T, "ranks": 2}),
    ]  # fmt: skip


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
            err = float(np.abs(a - b).max())
    finally:
        cluster.close()
    t1, t2 = (statistics.median(times[k]) for k in ("one", "two"))
    return [
        Row(SUITE, "Dask: batched rank-1 update, 2 workers", f"{count} x {n}x{n}, 4 blocks",
            "1 worker process (1 thread)", t1, t2, err, None,
            "2 worker processes x 1 thread; factors kept on the workers; error: max |1 - 2|",
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
        T, heads, repeats = by_mode((4096, 8, 5), (512, 4, 3), (64, 2, 1))
        rows += context_rows(T, heads, repeats)
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
