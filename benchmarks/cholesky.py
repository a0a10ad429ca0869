"""Benchmarks of dplr's Cholesky update and downdate against refactorisation.

Every ratio compares timings taken in the same run (medians).  Run with
``python -m dplr_bench.cholesky [--quick]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

import dplr

from ._common import (
    Progress,
    Row,
    by_mode,
    format_table,
    median_times,
    noop_progress,
)

SUITE = "cholesky"
NEW = "numpy.linalg.cholesky of the new matrix"
GRID_CASE = 'update, method="auto"'


def _spd(rng: np.random.Generator, n: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    x = rng.standard_normal((*batch, n, n))
    return x @ np.swapaxes(x, -1, -2) / n + np.eye(n)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _times(*fns, slow: float = 0.4, settle: float | None = None) -> list[float]:
    """Seconds per call of each function: medians of 7 alternating samples (3 with
    ``--quick``) after two warm-up calls (the first calls pay for page faults of
    new results and for starting BLAS threads); a function whose first call takes
    over ``slow`` s is timed by one more call instead."""
    return median_times(fns, repeats=by_mode(7, 3), warmup=2, settle=settle, once_above=slow)


def _series_time(fn, settle: float | None, slow: float = 0.4) -> float:
    """Seconds per call of ``fn`` from one series of its own (one call if slow)."""
    return median_times([fn], by_mode(7, 3), 2, settle or 0.0, first_settle_only=True,
                        once_above=slow)[0]  # fmt: skip


def _rank1_rows(rng, n: int) -> list[Row]:
    a = _spd(rng, n)
    L = np.linalg.cholesky(a)
    u = rng.standard_normal(n) / np.sqrt(n)
    b = a + np.outer(u, u)
    ref = np.linalg.cholesky(b)
    t_chol, t_copy, t_dplr = _times(
        lambda: np.linalg.cholesky(b), lambda: np.copy(L), lambda: dplr.cholesky_update(L, u)
    )
    err = _rel(dplr.cholesky_update(L, u), ref)
    size, params = f"N={n}", {"N": n, "M": 1, "method": "auto"}
    return [
        Row(SUITE, "rank-1 update", size, NEW, t_chol, t_dplr, err, 10.0,
            "new array returned", params),
        Row(SUITE, "rank-1 update", size, "numpy.copy(L)", t_copy, t_dplr, err, 1 / 3,
            "aim: at most 3x the time of one copy of the factor", params),
    ]  # fmt: skip


def _rank_m_rows(rng, n: int, m: int) -> list[Row]:
    a = _spd(rng, n)
    u = rng.standard_normal((n, m)) / np.sqrt(n * m)
    b = a + u @ u.T
    L, Lb = np.linalg.cholesky(a), np.linalg.cholesky(b)
    rows = []
    for case, f, start, ref, refmat in (
        ("update", dplr.cholesky_update, L, Lb, b),
        ("downdate", dplr.cholesky_downdate, Lb, L, a),
    ):
        t_ref, t_blk, t_r1 = _times(
            lambda refmat=refmat: np.linalg.cholesky(refmat),
            lambda f=f, start=start: f(start, u, method="blocked"),
            lambda f=f, start=start: f(start, u, method="rank1"),
        )
        err = _rel(f(start, u, method="blocked"), ref)
        size, params = f"N={n}, M={m}", {"N": n, "M": m, "method": "blocked"}
        rows += [
            Row(SUITE, f"rank-{m} {case}, blocked", size, NEW, t_ref,
                t_blk, err, 5.0, "B formed beforehand (not timed)", params),
            Row(SUITE, f"rank-{m} {case}, blocked", size, 'method="rank1"', t_r1, t_blk, err, 5.0,
                "", params),
        ]  # fmt: skip
    return rows


def _grid_rows(rng, ns, ms, progress: Progress) -> list[Row]:
    rows = []
    for n in ns:
        a = _spd(rng, n)
        L = np.linalg.cholesky(a)
        for m in ms:
            progress(f"cholesky grid N={n} M={m}")
            u = rng.standard_normal((n, m)) / np.sqrt(n * m)
            methods = ("rank1", "blocked", "refactor")
            call = {
                meth: lambda meth=meth, L=L, u=u: dplr.cholesky_update(L, u, method=meth)
                for meth in (*methods, "auto")
            }
            # Below N = 1000 every method runs BLAS on one thread: no pauses.
            settle = None if n >= 1000 else 0.0
            # 1. The fastest method, from one series of each: a method's own
            #    runs keep its allocations warm, while a run right after another
            #    method's paid for that one's (up to 2.5x at N = 500).
            times = {meth: _series_time(call[meth], settle) for meth in methods}
            best = min(methods, key=times.get)
            # 2. auto against it, their samples alternating: the same conditions
            #    for both (separate series of the same code differed by 35%).
            t_best, times["auto"] = _times(call[best], call["auto"], settle=settle)
            ref = np.linalg.cholesky(a + u @ u.T)
            err = _rel(dplr.cholesky_update(L, u), ref)
            note = "; ".join(f"{k} {1e3 * v:.2f} ms" for k, v in times.items() if k != "auto")
            rows.append(
                Row(SUITE, GRID_CASE, f"N={n}, M={m}", f'the fastest method here, "{best}"',
                    t_best, times["auto"], err, 1 / 1.2, note,
                    {"plot": "chol_vs_M", "N": n, "M": m, "method": "auto", "fastest": best,
                     **{f"{k}_s": v for k, v in times.items()}})
            )  # fmt: skip
    return rows


def crossovers(rows: list[Row]) -> dict[int, int | None]:
    """Per N, the smallest M of the grid at which refactorisation was the fastest."""
    out: dict[int, int | None] = {}
    for r in rows:
        if r.case != GRID_CASE:
            continue
        n = r.params["N"]
        out.setdefault(n, None)
        if r.params["fastest"] == "refactor" and out[n] is None:
            out[n] = r.params["M"]
    return out


def _rbf(n: int, noise: float) -> np.ndarray:
    """RBF kernel, length scale 0.5, on n points of [0, 10], plus noise * I."""
    x = np.linspace(0.0, 10.0, n)
    return np.exp(-0.5 * ((x[:, None] - x[None, :]) / 0.5) ** 2) + noise * np.eye(n)


def _backward(new: np.ndarray, b: np.ndarray, ref_norm: float) -> float:
    return float(np.linalg.norm(new @ new.T - b) / ref_norm)


def _tpqrt_plain(L: np.ndarray, u: np.ndarray, nb: int):
    """SciPy's ?tpqrt on [L^T; U^T] as a user would call it (SciPy copies the inputs)."""
    from scipy.linalg import lapack

    return lapack.dtpqrt(0, nb, L.T, u.T)


def _gp_speed_rows(rng, n: int, m: int) -> list[Row]:
    """The stable blocked update on an ill-conditioned factor (cond(L) ~ 1e5)."""
    a = _rbf(n, 1e-8)
    L = np.linalg.cholesky(a)
    u = rng.standard_normal((n, m))
    b = a + u @ u.T
    nb = min(32, n)
    t_chol, t_tpqrt, t_dplr = _times(
        lambda: np.linalg.cholesky(b),
        lambda: _tpqrt_plain(L, u, nb),
        lambda: dplr.cholesky_update(L, u, method="blocked"),
    )
    err = _backward(dplr.cholesky_update(L, u, method="blocked"), b, np.linalg.norm(b))
    size = f"N={n}, M={m}, RBF + 1e-8 I"
    params = {"N": n, "M": m, "method": "blocked", "noise": 1e-8}
    note = "error: ||L'L'^T - B||_F / ||B||_F"
    return [
        Row(SUITE, f"rank-{m} update, blocked, ill-conditioned", size,
            "numpy.linalg.cholesky of the new matrix", t_chol, t_dplr, err, 4.0,
            note + "; B formed beforehand (not timed)", params),
        Row(SUITE, f"rank-{m} update, blocked, ill-conditioned", size,
            f"scipy dtpqrt on [L^T; U^T] (nb={nb})", t_tpqrt, t_dplr, err, 1.0, note, params),
    ]  # fmt: skip


def _gp_accuracy_rows(rng, sizes: tuple[int, int, int, int]) -> list[Row]:
    """Backward error and time of every method on RBF kernels with small noise (three
    levels; ``--quick`` the smallest only: these 24 timings took 9 of its 55 s)."""
    nu, mu, nd, md = sizes
    rows = []
    for noise in by_mode((1e-2, 1e-6, 1e-10), (1e-10,)):
        k = _rbf(nu, noise)
        L = np.linalg.cholesky(k)
        u = rng.standard_normal((nu, mu))
        b = k + u @ u.T
        kd = _rbf(nd, noise)
        ud = 0.1 * rng.standard_normal((nd, md))
        ad = kd + ud @ ud.T
        Ld = np.linalg.cholesky(ad)
        for case, f, start, uu, target, norm, size, refmat in (
            ("update", dplr.cholesky_update, L, u, b, np.linalg.norm(b), f"N={nu}, M={mu}", b),
            ("downdate", dplr.cholesky_downdate, Ld, ud, kd, np.linalg.norm(ad),
             f"N={nd}, M={md}", kd),
        ):  # fmt: skip
            for method in ("auto", "rank1", "blocked", "refactor"):
                t_ref, t_m = _times(
                    lambda refmat=refmat: np.linalg.cholesky(refmat),
                    lambda f=f, start=start, uu=uu, method=method: f(start, uu, method=method),
                )
                err = _backward(f(start, uu, method=method), target, norm)
                rows.append(
                    Row(SUITE, f"ill-conditioned {case}, {method}", f"{size}, RBF + {noise:.0e} I",
                        "numpy.linalg.cholesky of the new matrix", t_ref, t_m, err, None,
                        f"error: ||L'L'^T - B||_F / ||{'B' if case == 'update' else 'A'}||_F",
                        {"N": int(start.shape[0]), "M": int(uu.shape[1]), "method": method,
                         "noise": noise})
                )  # fmt: skip
    return rows


def _batch_rows(rng, count: int, n: int) -> list[Row]:
    a = _spd(rng, n, (count,))
    L = np.linalg.cholesky(a)
    u = rng.standard_normal((count, n)) / np.sqrt(n)
    b = a + u[:, :, None] * u[:, None, :]
    t_ref, t_copy, t_dplr = _times(
        lambda: np.linalg.cholesky(b),
        lambda: np.copy(L),
        lambda: dplr.cholesky_update(L, u[..., None]),
    )
    err = _rel(dplr.cholesky_update(L, u[..., None]), np.linalg.cholesky(b))
    size, params = f"{count} x {n}x{n}", {"N": n, "M": 1, "batch": count, "method": "auto"}
    return [
        Row(SUITE, "batched rank-1 update", size, "numpy.linalg.cholesky of the new matrix",
            t_ref, t_dplr, err, 5.0, "", params),
        # Any update returning a new stack reads it and fills fresh memory:
        # refactorisation / copy is the most any method can gain.
        Row(SUITE, "batched rank-1 update", size, "numpy.copy(L)", t_copy, t_dplr, err, None,
            f"bound for a new array: cholesky / copy = {t_ref / t_copy:.1f}x", params),
    ]  # fmt: skip


_JIT_SCRIPT = """
import time, numpy as np
t = time.perf_counter()
import dplr
L = np.eye(40); u = np.full(40, 0.1)
t1 = time.perf_counter()
dplr.cholesky_update(L, u, method="rank1"); dplr.cholesky_downdate(L, u, method="rank1")
print(time.perf_counter() - t1)
"""


def _jit_rows() -> list[Row]:
    """First call of the compiled kernels in a new process: empty cache, then warm cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}

        def first_call() -> float:
            cmd = [sys.executable, "-c", _JIT_SCRIPT]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            return float(out.stdout.strip().splitlines()[-1])

        cold, warm = first_call(), first_call()
        cached = any(name.endswith(".nbi") for _, _, files in os.walk(cache) for name in files)
    return [
        Row(SUITE, "JIT first call (compile)", "rank-1 kernels, float64", "empty cache", cold,
            warm, None, None, f"disk cache {'used' if cached else 'NOT written'}; dplr = warm",
            {"method": "rank1"})
    ]  # fmt: skip


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """All Cholesky benchmarks; ``quick`` uses small sizes (a few seconds)."""
    progress = progress or noop_progress
    rng = np.random.default_rng(0)
    big = by_mode(3000, 600, 64)
    progress("cholesky: rank-1 update")
    rows = _rank1_rows(rng, big)
    progress("cholesky: rank-32 update and downdate")
    rows += _rank_m_rows(rng, big, 32)
    progress("cholesky: ill-conditioned factors")
    rows += _gp_speed_rows(rng, big, 32)
    rows += _gp_accuracy_rows(rng, by_mode((500, 16, 800, 64), (200, 16, 300, 32), (40, 4, 40, 4)))
    ns, ms = by_mode(((100, 500, 2000, 4000), (1, 4, 16, 64, 256)), ((100, 500), (1, 16)),
                     ((40,), (1, 4)))  # fmt: skip
    rows += _grid_rows(rng, ns, ms, progress)
    progress("cholesky: batched rank-1")
    rows += _batch_rows(rng, by_mode(10000, 300, 20), 32)
    if by_mode(True, False):
        progress("cholesky: JIT compile time")
        rows += _jit_rows()
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rows = run(quick="--quick" in argv, progress=lambda s: print(s, file=sys.stderr))
    print(format_table(rows))
    print("\nM at which refactorisation is first the fastest, per N:", crossovers(rows))


if __name__ == "__main__":
    main()
