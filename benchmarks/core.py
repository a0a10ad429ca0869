"""Benchmarks of the core structure (``dplr.LowRankTril``) against dense baselines.

Run ``python -m dplr bench --suite core`` (or ``python -m dplr_bench.core``).
Matrices come from the delta-rule family (unit-norm rows of k, q = beta k,
beta in (0, 1)), which stays well conditioned for any n; with Gaussian q and
k the entries of T^-1 grow exponentially with n and timings would measure
overflow, not the algorithm.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sl

import dplr
from dplr.reference import tril_dense

from ._common import (
    Progress,
    Row,
    by_mode,
    median_time,
    median_times,
    noop_progress,
    peak_memory_mib,
    rel_error,
)

SUITE = "core"

#: Runs per median and warm-up runs: timings on a shared virtual machine vary
#: up to 2x over seconds, so more than usual (and baseline and dplr alternate).
REPEATS, WARMUP = 9, 2


def _repeats() -> int:
    """:data:`REPEATS`, or 5 in a quick run."""
    return by_mode(REPEATS, 5)


#: dplr's documented default chunk size, passed explicitly where flops are
#: counted, so that the count is that of the algorithm which ran.
CHUNK = 32


def delta_family(rng: np.random.Generator, batch: tuple[int, ...], n: int, d: int, dtype=float):
    """q, k of the delta-rule family: ``T = I + tril(beta k k^T, -1)``."""
    k = rng.standard_normal((*batch, n, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.uniform(0.0, 1.0, (*batch, n, 1)) * k
    return q.astype(dtype), k.astype(dtype)


def solve_flops(n: int, d: int, m: int, c: int) -> float:
    """Flops of the chunked solve as dplr runs it (docs/algorithms.md, section 4):
    the strict lower triangles of the diagonal blocks (n c d), the triangular
    solves with them (n c m) and the two products per chunk of the state
    pass (4 n d m)."""
    return n * c * d + n * c * m + 4 * n * d * m


def numpy_chunked_solve(q: np.ndarray, k: np.ndarray, v: np.ndarray, c: int) -> np.ndarray:
    """The textbook chunked solve in NumPy: per chunk, ``np.linalg.inv`` of the
    diagonal block, then two products that carry the state to the next chunk."""
    n = q.shape[0]
    y, z = np.zeros_like(v), np.zeros((q.shape[1], v.shape[1]))
    for s in range(0, n, c):
        block = np.tril(q[s : s + c] @ k[s : s + c].T, -1) + np.eye(min(c, n - s))
        x = np.linalg.inv(block)
        y[s : s + c] = x @ (v[s : s + c] - q[s : s + c] @ z)
        z += k[s : s + c].T @ y[s : s + c]
    return y


def bench_solve_vs_dense(rng, n: int, d: int = 64, m: int = 64) -> Row:
    repeats = _repeats()
    q, k = delta_family(rng, (), n, d)
    v = rng.standard_normal((n, m))
    T = dplr.LowRankTril(q, k)
    dense = tril_dense(q, k)  # the definition, built outside dplr; not timed
    ref = sl.solve_triangular(dense, v, lower=True, check_finite=False)
    x = T.solve(v)
    # Two series, not alternating runs: each dense solve streams the 2 GiB
    # matrix through the caches, and a solve timed right after it would be
    # measured cold, unlike in a loop of solves.
    t_dense = median_time(lambda: _dense_solve(dense, v), repeats, WARMUP)
    dense = None  # not kept alive (n = 16384: 2 GiB) while dplr is timed
    t_dplr = median_time(lambda: T.solve(v), repeats, WARMUP, settle=0.3)
    return Row(
        SUITE, "solve, float64", f"n={n}, d={d}, m={m}", "scipy solve_triangular on the dense T",
        t_dense, t_dplr, rel_error(x, ref), target=20.0 if n >= 16384 else None,
        params={"plot": "solve_vs_n", "n": n},
    )  # fmt: skip


def _dense_solve(dense: np.ndarray, v: np.ndarray) -> np.ndarray:
    return sl.solve_triangular(dense, v, lower=True, check_finite=False)


def bench_solve_vs_numpy_loop(rng, n: int, heads: int = 8, d: int = 64, m: int = 64) -> Row:
    """Against the NumPy chunked loop at its best chunk size (c = 32, 64 or 200)."""
    q, k = delta_family(rng, (heads,), n, d)
    v = rng.standard_normal((heads, n, m))
    T = dplr.LowRankTril(q, k)

    def loop(c: int) -> list[np.ndarray]:
        return [numpy_chunked_solve(q[h], k[h], v[h], c) for h in range(heads)]

    times = {
        c: median_time(lambda c=c: loop(c), _repeats(), WARMUP)
        for c in by_mode((32, 64, 200), (32, 64))
    }
    best = min(times, key=times.get)
    err = rel_error(T.solve(v), np.stack(loop(best)))
    t_loop, t_dplr = median_times([lambda: loop(best), lambda: T.solve(v)], _repeats(), WARMUP)
    return Row(
        SUITE, "solve, float64, batch of heads", f"{heads} heads, n={n}, d={d}, m={m}",
        f"NumPy chunked loop with np.linalg.inv per chunk (best c={best}), head by head",
        t_loop, t_dplr, err, target=1.5,
        note="NumPy loop: " + ", ".join(f"c={c} {1e3 * t:.1f} ms" for c, t in times.items()),
    )  # fmt: skip


def bench_inverse(rng, n: int, d: int = 64) -> Row:
    q, k = delta_family(rng, (), n, d)
    T = dplr.LowRankTril(q, k)
    dense, eye = tril_dense(q, k), np.eye(n)
    ref = sl.solve_triangular(dense, eye, lower=True, check_finite=False)
    t_dense = median_time(lambda: _dense_solve(dense, eye), 3)
    t_dplr = median_time(T.inv, 3, settle=0.3)
    return Row(
        SUITE, "inv, float64", f"n={n}, d={d}", "scipy solve_triangular(T, I) on the dense T",
        t_dense, t_dplr, rel_error(T.inv(), ref), target=1.0,
    )  # fmt: skip


def bench_gflops(rng, batch: int, n: int, d: int = 64, m: int = 64) -> Row:
    """Achieved GFLOP/s of the float32 solve against one matrix product of equal flops.

    The error cell stays empty: the product computes something else.
    """
    q, k = delta_family(rng, (batch,), n, d, np.float32)
    v = rng.standard_normal((batch, n, m)).astype(np.float32)
    T = dplr.LowRankTril(q, k)
    c = min(CHUNK, n)
    flops = batch * solve_flops(n, d, m, c)
    size = round((flops / 2) ** (1 / 3))
    a = rng.standard_normal((size, size)).astype(np.float32)
    # Two series with a pause between them: the multi-threaded GEMM leaves
    # OpenBLAS threads spinning, which alternating runs would time into the solve.
    t_gemm = median_time(lambda: a @ a, _repeats(), WARMUP)
    t_solve = median_time(lambda: T.solve(v, chunk_size=c), _repeats(), WARMUP, settle=0.3)
    solve_rate, gemm_rate = flops / t_solve / 1e9, 2 * size**3 / t_gemm / 1e9
    return Row(
        SUITE, "solve GFLOP/s vs one matrix product, float32",
        f"batch={batch}, n={n}, d={d}, m={m}, c={c}",
        f"one {size}x{size} NumPy matmul (same flops)", t_gemm, t_solve, None, target=0.3,
        note=f"solve {solve_rate:.0f} GFLOP/s (n c d + n c m + 4 n d m flops), "
        f"matmul {gemm_rate:.0f} GFLOP/s",
        params={"solve_gflops": solve_rate, "gemm_gflops": gemm_rate},
    )  # fmt: skip


def bench_chunk_sizes(rng, n: int, sizes=(16, 32, 64, 128, 256), d: int = 64) -> list[Row]:
    """Each chunk size against the default: ratio < 1 means the default is faster.

    The baseline is dplr itself, so the error cells stay empty.
    """
    q, k = delta_family(rng, (), n, d)
    v = rng.standard_normal((n, d))
    T = dplr.LowRankTril(q, k)
    solves = [lambda: T.solve(v)] + [lambda c=c: T.solve(v, chunk_size=c) for c in sizes]
    default, *times = median_times(solves, REPEATS, WARMUP, settle=0.0)
    return [
        Row(
            SUITE, f"solve with chunk_size={c}", f"n={n}, d={d}, m={d}",
            f"dplr with the default chunk_size ({CHUNK})", default, t, None,
            params={"chunk": c},
        )
        for c, t in zip(sizes, times, strict=True)
    ]  # fmt: skip


def bench_per_channel(rng, n: int, d: int, m: int | None = None) -> Row:
    """Per-channel decay (log decay -5..0 per row and channel) against one decay per row.

    float32; the error is against the float64 per-channel solve.  Ratio < 1
    means the per-channel solve is slower (it forms its diagonal blocks from
    anchored sub-blocks, docs/algorithms.md section 10).
    """
    m = m or d
    q, k = delta_family(rng, (), n, d, np.float32)
    v = rng.standard_normal((n, m)).astype(np.float32)
    per_channel = -rng.uniform(0.0, 5.0, (n, d)).astype(np.float32)
    T_row = dplr.LowRankTril(q, k, log_decay=per_channel[:, 0].copy())
    T_chan = dplr.LowRankTril(q, k, log_decay=per_channel)
    t_row, t_chan = median_times([lambda: T_row.solve(v), lambda: T_chan.solve(v)], REPEATS, WARMUP)
    # Row i of the solution depends on rows <= i only: the leading rows are
    # checked against SciPy on the dense per-channel T built here in float64.
    lead = min(n, 256)
    q64, k64, g64 = (x[:lead].astype(np.float64) for x in (q, k, per_channel))
    cum = np.cumsum(g64, 0)
    dense = np.einsum("ic,jc,ijc->ij", q64, k64, np.exp(cum[:, None] - cum[None, :]))
    dense = np.tril(dense, -1) + np.eye(lead)
    ref = sl.solve_triangular(dense, v[:lead].astype(np.float64), lower=True)
    return Row(
        SUITE, "per-channel decay solve, float32", f"n={n}, d={d}, m={m}, decay -5..0",
        "solve with one decay per row", t_row, t_chan, rel_error(T_chan.solve(v)[:lead], ref),
        note=f"error: first {lead} rows against scipy solve_triangular on the dense T (float64)",
    )  # fmt: skip


def _compiled_recurrence():
    """A bare compiled O(n d m) loop for ``T = I + tril(Q K^T, -1)``:
    ``y_i = v_i - S^T q_i``, then ``S += k_i y_i^T`` (built once per process)."""
    import numba

    @numba.njit(cache=True)
    def solve(q, k, v):  # pragma: no cover - compiled
        n, d = q.shape
        m = v.shape[1]
        y = np.empty_like(v)
        state = np.zeros((d, m))
        for i in range(n):
            for j in range(m):
                acc = v[i, j]
                for c in range(d):
                    acc -= q[i, c] * state[c, j]
                y[i, j] = acc
            for c in range(d):
                for j in range(m):
                    state[c, j] += k[i, c] * y[i, j]
        return y

    return solve


def _small_rank_setup(n: int, d: int, m: int):
    """Inputs of the small-rank row and the solve to measure (for peak_memory_mib)."""
    q, k = delta_family(np.random.default_rng(0), (), n, d)
    v = np.random.default_rng(1).standard_normal((n, m))
    dplr.tril_solve(q[:64], k[:64], v[:64])  # compiled code loaded before the measurement
    return lambda: dplr.tril_solve(q, k, v)


def bench_small_rank(rng, n: int, d: int = 4, m: int = 1) -> Row:
    """Small d: dplr's solve against a bare compiled row-by-row loop."""
    q, k = delta_family(rng, (), n, d)
    v = rng.standard_normal((n, m))
    loop = _compiled_recurrence()
    loop(q[:8], k[:8], v[:8])  # compile outside the timing
    t_loop, t_dplr, t_unchecked = median_times(
        [lambda: loop(q, k, v), lambda: dplr.tril_solve(q, k, v),
         lambda: dplr.tril_solve(q, k, v, check_finite=False)], _repeats(), WARMUP,
    )  # fmt: skip
    err = rel_error(dplr.tril_solve(q, k, v), loop(q, k, v))
    operands_mib = (2 * n * d + 2 * n * m) * 8 / 2**20  # q, k, v and the output
    extra = peak_memory_mib(_small_rank_setup, n, d, m) / operands_mib
    note = f"check_finite=False: {1e3 * t_unchecked:.1f} ms ({t_loop / t_unchecked:.2f}x)"
    note += f"; peak memory growth {extra:.2f}x the inputs + output"
    return Row(SUITE, "solve, small rank", f"n={n}, d={d}, m={m}",
               "a bare compiled (Numba) row-by-row loop", t_loop, t_dplr, err, 0.5, note,
               {"n": n, "d": d, "m": m, "peak_extra": extra})  # fmt: skip


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """All core benchmarks; ``quick`` uses smaller sizes (well under 20 s)."""
    say = progress or noop_progress
    rng = np.random.default_rng(0)
    rows = []
    for n in by_mode((256, 1024, 4096, 16384), (256, 1024, 4096), (64, 256)):
        say(f"core: solve vs dense, n={n}")
        rows.append(bench_solve_vs_dense(rng, n))
    medium = by_mode(4096, 1024, 128)
    say("core: solve vs a NumPy chunked loop")
    rows.append(bench_solve_vs_numpy_loop(rng, medium, heads=by_mode(8, 8, 2)))
    say("core: dense inverse")
    rows.append(bench_inverse(rng, medium))
    say("core: GFLOP/s against a matrix product")
    rows.append(bench_gflops(rng, by_mode(16, 16, 2), medium))
    for d in (64, 128):
        say(f"core: per-channel decay, d={d}")
        rows.append(bench_per_channel(rng, by_mode(4096, 1024, 128), d))
    for d in (2, 4, 8):
        say(f"core: small rank, d={d}")
        rows.append(bench_small_rank(rng, by_mode(1_000_000, 200_000, 1000), d))
    if by_mode(True, False, True):
        say("core: chunk-size sweep")
        rows.extend(bench_chunk_sizes(rng, by_mode(16384, 0, 256)))
    return rows


if __name__ == "__main__":
    from ._common import format_table

    print(format_table(run(progress=print)))
