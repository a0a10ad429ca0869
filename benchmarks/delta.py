"""Delta rule: the chunked solve against the token recurrence and a naive chunked form.

PyTorch on the CPU, float32, B = 1, H = 8, K = V = 64 (the issue's setting):

- forward, T = 4096, against the token-by-token recurrence and against a
  chunked reference that builds each chunk's inverse by row-by-row forward
  substitution; the achieved GFLOP/s against one large matrix product;
- forward + backward against 3.5 x the forward, and against the recurrence
  under autograd, with the peak memory of each (in a fresh process);
- throughput (tokens per second) against T;
- NumPy float64 against PyTorch float64.

Run ``python -m dplr_bench.delta`` (or ``python benchmarks/delta.py``).
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import time

import numpy as np

try:
    from ._common import Progress, Row, format_table, median_time, noop_progress
except ImportError:  # run as a script
    from _common import Progress, Row, format_table, median_time, noop_progress

import dplr

SUITE = "delta"
H, K, V, CHUNK = 8, 64, 64, 64


# ------------------------------------------------------------------ references
def recurrent(q, k, v, beta, scale):
    """Token by token, vectorised over heads; (B, H, T, .) layout."""
    import torch

    B, Hh, T, Kk = q.shape
    S = q.new_zeros(B, Hh, Kk, v.shape[-1])
    out = []
    for t in range(T):
        kt = k[:, :, t, :, None]
        u = beta[:, :, t, None, None] * (v[:, :, t, None, :] - kt.mT @ S)
        S = S + kt * u
        out.append(q[:, :, t, None, :] @ S)
    return scale * torch.cat(out, -2), S


def naive_chunked(q, k, v, beta, scale, c=CHUNK):
    """The textbook chunked form: each chunk's inverse by forward substitution, row by row."""
    import torch

    B, Hh, T, Kk = q.shape
    n = T // c
    q, k, v = (x.reshape(B, Hh, n, c, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(B, Hh, n, c, 1)
    kb = beta * k
    X = -(kb @ k.mT).tril(-1)
    for i in range(1, c):  # row i of (I + tril(kb k^T, -1))^-1 from the rows above it
        X[..., i, :i] = X[..., i, :i] + (X[..., i, :i, None] * X[..., :i, :i]).sum(-2)
    X = X + torch.eye(c, dtype=q.dtype)
    w, u = X @ kb, X @ (beta * v)
    causal = torch.ones(c, c, dtype=torch.bool).tril()
    S = q.new_zeros(B, Hh, Kk, v.shape[-1])
    out = torch.empty_like(v)
    for j in range(n):
        u_j = u[:, :, j] - w[:, :, j] @ S
        scores = (q[:, :, j] @ k[:, :, j].mT).masked_fill(~causal, 0.0)
        out[:, :, j] = q[:, :, j] @ S + scores @ u_j
        S = S + k[:, :, j].mT @ u_j
    return scale * out.reshape(B, Hh, T, -1), S


def chunked_flops(T: int, heads: int = H, d: int = K, m: int = V, c: int = CHUNK) -> float:
    """Flops of dplr's chunked forward (docs/delta.md): solve + product from the states."""
    per_head = 4 * T * c * d + T * c * (d + m) + 2 * T * c * m + 6 * T * d * m
    return float(heads * per_head)


# ------------------------------------------------------------------------ inputs
def make_inputs(T: int, dtype="float32", seed: int = 0):
    """Torch tensors in the public layout [B, T, H, .]: unit-norm keys, beta in (0, 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(1, T, H, K, generator=gen, dtype=dt)
    k = torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=gen, dtype=dt), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen, dtype=dt)
    beta = torch.rand(1, T, H, generator=gen, dtype=dt)
    return q, k, v, beta


def _heads_first(*xs):
    return [x.transpose(1, 2).contiguous() for x in xs]


def _rel(a, b) -> float:
    a, b = (np.asarray(x.detach().double().numpy() if hasattr(x, "detach") else x) for x in (a, b))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---------------------------------------------------------------- peak memory
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(which: str, T: int, conn) -> None:
    """In a fresh process: growth of the peak RSS (MiB) over one forward + backward.

    The peak (VmHWM) is reset after the imports and inputs (``clear_refs``
    5, Linux), so that neither torch's import nor compilation counts.
    """
    import torch

    q, k, v, beta = (x.requires_grad_() for x in make_inputs(T))
    hq, hk, hv, hb = (x.transpose(1, 2) for x in (q, k, v, beta))
    dplr.delta_rule(q[:, :64], k[:, :64], v[:, :64], beta[:, :64])  # warm up the code paths
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    if which == "chunked":
        o, _ = dplr.delta_rule(q, k, v, beta)
    else:
        o, _ = recurrent(hq, hk, hv, hb, K**-0.5)
    torch.autograd.grad((o.sum(),), (q, k, v, beta))
    conn.send(_status_mib("VmHWM") - before)
    conn.close()


def peak_memory_mib(which: str, T: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_child, args=(which, T, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return float(value)


# ---------------------------------------------------------------------- suite
def paired_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed in turns (one run of each per round).

    On a shared machine the load drifts; taking turns exposes every method to
    the same drift, so the ratios of the medians are fairer than those of
    medians taken one method after the other.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _matmul_gflops(torch, repeats: int) -> tuple[float, float]:
    """GFLOP/s of one 1024^2 float32 product and of 512 batched 64^3 products."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big = 2 * 1024**3 / median_time(lambda: a @ b, repeats) / 1e9
    x, y = torch.randn(512, 64, 64), torch.randn(512, 64, 64)
    small = 2 * 512 * 64**3 / median_time(lambda: x @ y, repeats) / 1e9
    return big, small


def _loss_grads(torch, o, s, inputs):
    return torch.autograd.grad((o.sum() + s.sum(),), inputs)


def _forward_rows(torch, T: int, reps: int, quick: bool) -> list[Row]:
    size = f"B=1 T={T} H={H} K=V={K}"
    q, k, v, beta = make_inputs(T)
    hq, hk, hv, hb = _heads_first(q, k, v, beta)
    scale = K**-0.5
    with torch.no_grad():
        o, _ = dplr.delta_rule(q, k, v, beta)
        o_rec, _ = recurrent(hq, hk, hv, hb, scale)
        o_naive, _ = naive_chunked(hq, hk, hv, hb, scale)
        t = paired_medians(
            {"ours": lambda: dplr.delta_rule(q, k, v, beta),
             "rec": lambda: recurrent(hq, hk, hv, hb, scale),
             "naive": lambda: naive_chunked(hq, hk, hv, hb, scale)}, reps,
        )  # fmt: skip
        t_ours, t_rec, t_naive = t["ours"], t["rec"], t["naive"]
        big, small = _matmul_gflops(torch, reps)
    gflops = chunked_flops(T) / t_ours / 1e9
    note = (
        f"{gflops:.0f} GFLOP/s = {gflops / big:.0%} of a 1024^2 matmul ({big:.0f} GFLOP/s); "
        f"batched 64^3 products: {small:.0f} GFLOP/s"
    )
    params = {"T": T, "tokens_per_s": T / t_ours, "method": "chunked", "gflops": gflops,
              "matmul_gflops": big, "bmm64_gflops": small}  # fmt: skip
    o = o.transpose(1, 2)
    return [
        Row(SUITE, "forward float32", size, "token recurrence", t_rec, t_ours,
            _rel(o, o_rec), 15.0, note, params),
        Row(SUITE, "forward float32", size, "naive chunked (row-by-row inverse)", t_naive,
            t_ours, _rel(o, o_naive), 3.0, "", params),
    ]  # fmt: skip


def _backward_rows(torch, T: int, reps: int, quick: bool) -> list[Row]:
    size = f"B=1 T={T} H={H} K=V={K}"
    ours_in = [x.requires_grad_() for x in make_inputs(T)]
    rec_in = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in ours_in]

    def ours():
        o, s = dplr.delta_rule(*ours_in, output_final_state=True)
        return _loss_grads(torch, o, s, ours_in)

    def rec():
        o, s = recurrent(*rec_in, K**-0.5)
        return _loss_grads(torch, o, s, rec_in)

    got, want = ours(), rec()
    err = max(_rel(a.transpose(1, 2), b) for a, b in zip(got, want, strict=True))

    def forward():
        with torch.no_grad():
            return dplr.delta_rule(*ours_in, output_final_state=True)

    t = paired_medians({"fwd": forward, "fb": ours}, 2 * reps)
    t_fwd, t_fb = t["fwd"], t["fb"]
    t_rec = median_time(rec, 1, warmup=0)
    ratio = t_fb / t_fwd
    rows = [
        Row(SUITE, "fwd+bwd float32 vs 3.5 x forward", size, "3.5 x dplr forward", 3.5 * t_fwd,
            t_fb, err, 1.0, f"fwd+bwd = {ratio:.2f} x forward",
            {"T": T, "fwd_bwd_over_fwd": ratio, "method": "chunked"}),
    ]  # fmt: skip
    note, mem = "", {}
    if not quick:
        mem = {"peak_mib": peak_memory_mib("chunked", T),
               "baseline_peak_mib": peak_memory_mib("recurrent", T)}  # fmt: skip
        note = (
            f"peak memory (RSS growth) {mem['peak_mib']:.0f} MiB vs "
            f"{mem['baseline_peak_mib']:.0f} MiB for the recurrence"
        )
    rows.append(Row(SUITE, "fwd+bwd float32", size, "token recurrence under autograd", t_rec,
                    t_fb, err, None, note, {"T": T, "method": "chunked", **mem}))  # fmt: skip
    return rows


def _throughput_rows(torch, lengths) -> list[Row]:
    """One row per T: tokens per second of the chunked form and of the recurrence."""
    rows = []
    for n in lengths:
        q, k, v, beta = make_inputs(n)
        hq, hk, hv, hb = _heads_first(q, k, v, beta)
        with torch.no_grad():
            t_c = median_time(lambda q=q, k=k, v=v, b=beta: dplr.delta_rule(q, k, v, b), 3)
            start = time.perf_counter()  # one run: the recurrence alone takes seconds at T = 65536
            o_rec, _ = recurrent(hq, hk, hv, hb, K**-0.5)
            t_r = time.perf_counter() - start
            err = _rel(dplr.delta_rule(q, k, v, beta)[0].transpose(1, 2), o_rec)
        rows.append(Row(SUITE, "throughput", f"B=1 T={n} H={H} K=V={K}", "token recurrence",
                        t_r, t_c, err, None,
                        f"{n / t_c:,.0f} tokens/s (recurrence {n / t_r:,.0f})",
                        {"plot": "delta_tokens", "T": n, "chunked_tok_s": n / t_c,
                         "recurrent_tok_s": n / t_r}))  # fmt: skip
    return rows


def _numpy_row(torch, T: int, reps: int) -> Row:
    q, k, v, beta = make_inputs(T, "float64")
    arrays = [x.numpy() for x in (q, k, v, beta)]
    with torch.no_grad():
        o_torch, _ = dplr.delta_rule(q, k, v, beta)
        t = paired_medians({"torch": lambda: dplr.delta_rule(q, k, v, beta),
                            "numpy": lambda: dplr.delta_rule(*arrays)}, reps)  # fmt: skip
    t_torch, t_np = t["torch"], t["numpy"]
    err = _rel(dplr.delta_rule(*arrays)[0], o_torch)
    return Row(SUITE, "forward float64, NumPy", f"B=1 T={T} H={H} K=V={K}",
               "dplr PyTorch float64", t_torch, t_np, err, None, "",
               {"T": T, "method": "chunked"})  # fmt: skip


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """Benchmark rows; ``quick`` uses T = 1024 and fewer repeats (< 15 s)."""
    progress = progress or noop_progress
    try:
        import torch
    except ImportError:
        progress("torch is not installed: skipping the delta-rule benchmarks (all use torch)")
        return []
    reps = 3 if quick else 5
    T = 1024 if quick else 4096
    progress("delta: forward against the recurrence and the naive chunked form")
    rows = _forward_rows(torch, T, reps, quick)
    progress("delta: forward + backward" + ("" if quick else ", peak memory in fresh processes"))
    rows += _backward_rows(torch, T, reps, quick)
    progress("delta: throughput against T")
    rows += _throughput_rows(torch, (1024, 4096) if quick else (1024, 4096, 16384, 65536))
    progress("delta: NumPy float64 against PyTorch float64")
    rows.append(_numpy_row(torch, T, reps))
    return rows


if __name__ == "__main__":
    _rows = run(progress=print)
    print(format_table(_rows))
    for _row in _rows:
        if _row.note:
            print(f"- {_row.case} ({_row.size}, vs {_row.baseline}): {_row.note}")
