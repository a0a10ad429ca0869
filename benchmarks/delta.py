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

import multiprocessing
import resource

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
def _peak_child(which: str, T: int, conn) -> None:
    """In a fresh process: peak RSS growth (MiB) of one forward + backward."""
    import torch

    torch.set_num_threads(2)
    q, k, v, beta = (x.requires_grad_() for x in make_inputs(T))
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    if which == "chunked":
        o, _ = dplr.delta_rule(q, k, v, beta)
    else:
        hq, hk, hv, hb = (x.transpose(1, 2) for x in (q, k, v, beta))
        o, _ = recurrent(hq, hk, hv, hb, K**-0.5)
    o.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    conn.send(peak - before)
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
def _matmul_gflops(torch, repeats: int) -> float:
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    return 2 * 1024**3 / median_time(lambda: a @ b, repeats) / 1e9


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """Benchmark rows; ``quick`` uses T = 1024 and fewer repeats (< 15 s)."""
    progress = progress or noop_progress
    try:
        import torch
    except ImportError:
        progress("torch is not installed: skipping the delta-rule benchmarks (all use torch)")
        return []
    rows: list[Row] = []
    reps = 3 if quick else 5
    T = 1024 if quick else 4096
    size = f"B=1 T={T} H={H} K=V={K}"
    q, k, v, beta = make_inputs(T)
    hq, hk, hv, hb = _heads_first(q, k, v, beta)
    scale = K**-0.5

    def ours():
        return dplr.delta_rule(q, k, v, beta, output_final_state=True)

    with torch.no_grad():
        progress("delta: forward against the recurrence and the naive chunked form")
        o, s = ours()
        o_rec, s_rec = recurrent(hq, hk, hv, hb, scale)
        o_naive, _ = naive_chunked(hq, hk, hv, hb, scale)
        t_ours = median_time(ours, reps)
        t_rec = median_time(lambda: recurrent(hq, hk, hv, hb, scale), 1 if quick else 3)
        t_naive = median_time(lambda: naive_chunked(hq, hk, hv, hb, scale), reps)
        peak = _matmul_gflops(torch, reps)
    gflops = chunked_flops(T) / t_ours / 1e9
    err = _rel(o.transpose(1, 2), o_rec)
    rate = f"{gflops:.0f} GFLOP/s = {gflops / peak:.0%} of a 1024^2 matmul ({peak:.0f} GFLOP/s)"
    params = {"T": T, "tokens_per_s": T / t_ours, "gflops": gflops, "matmul_gflops": peak}
    rows.append(Row(SUITE, "forward float32", size, "token recurrence", t_rec, t_ours, err,
                    15.0, rate, {**params, "method": "chunked"}))  # fmt: skip
    rows.append(Row(SUITE, "forward float32", size, "naive chunked (row-by-row inverse)",
                    t_naive, t_ours, _rel(o.transpose(1, 2), o_naive), 3.0, "",
                    {**params, "method": "chunked"}))  # fmt: skip

    progress("delta: forward + backward")
    qg, kg, vg, bg = (x.clone().requires_grad_() for x in (q, k, v, beta))

    def ours_fb():
        o, s = dplr.delta_rule(qg, kg, vg, bg, output_final_state=True)
        torch.autograd.grad((o.sum() + s.sum(),), (qg, kg, vg, bg))

    hqg, hkg, hvg, hbg = (x.clone().requires_grad_() for x in (hq, hk, hv, hb))

    def rec_fb():
        o, s = recurrent(hqg, hkg, hvg, hbg, scale)
        return torch.autograd.grad((o.sum() + s.sum(),), (hqg, hkg, hvg, hbg))

    t_fb = median_time(ours_fb, reps)
    grads = dict(zip("qkvb", torch.autograd.grad(
        (lambda o, s: o.sum() + s.sum())(*dplr.delta_rule(qg, kg, vg, bg, output_final_state=True)),
        (qg, kg, vg, bg)), strict=True))  # fmt: skip
    ref_grads = rec_fb()
    g_err = max(_rel(grads["q"], ref_grads[0].transpose(1, 2)),
                _rel(grads["v"], ref_grads[2].transpose(1, 2)))  # fmt: skip
    ratio = t_fb / t_ours
    rows.append(Row(SUITE, "fwd+bwd float32 vs 3.5 x forward", size, "3.5 x dplr forward",
                    3.5 * t_ours, t_fb, g_err, 1.0, f"fwd+bwd = {ratio:.2f} x forward",
                    {"T": T, "fwd_bwd_over_fwd": ratio, "method": "chunked"}))  # fmt: skip
    t_rec_fb = median_time(rec_fb, 1)
    note, mem = "", {}
    if not quick:
        progress("delta: peak memory of forward + backward (fresh processes)")
        mem = {"peak_mib": peak_memory_mib("chunked", T),
               "baseline_peak_mib": peak_memory_mib("recurrent", T)}  # fmt: skip
        note = f"peak RSS growth {mem['peak_mib']:.0f} MiB vs {mem['baseline_peak_mib']:.0f} MiB"
    rows.append(Row(SUITE, "fwd+bwd float32", size, "token recurrence under autograd",
                    t_rec_fb, t_fb, g_err, None, note, {"T": T, **mem}))  # fmt: skip

    progress("delta: throughput against T")
    for n in (1024, 4096) if quick else (1024, 4096, 16384, 65536):
        q2, k2, v2, b2 = make_inputs(n)
        hq2, hk2, hv2, hb2 = _heads_first(q2, k2, v2, b2)
        with torch.no_grad():
            t_c = median_time(lambda: dplr.delta_rule(q2, k2, v2, b2), 3)
            t_r = median_time(lambda: recurrent(hq2, hk2, hv2, hb2, scale), 1, warmup=0)
        sz = f"B=1 T={n} H={H} K=V={K}"
        for method, t in (("chunked", t_c), ("recurrent", t_r)):
            rows.append(Row(SUITE, f"throughput {method}", sz, "token recurrence", t_r, t,
                            float("nan"), None, f"{n / t:,.0f} tokens/s",
                            {"T": n, "tokens_per_s": n / t, "method": method}))  # fmt: skip

    progress("delta: NumPy float64 against PyTorch float64")
    q64, k64, v64, b64 = make_inputs(T, "float64")
    nq, nk, nv, nb = (x.numpy() for x in (q64, k64, v64, b64))
    with torch.no_grad():
        t_torch = median_time(lambda: dplr.delta_rule(q64, k64, v64, b64), reps)
    t_np = median_time(lambda: dplr.delta_rule(nq, nk, nv, nb), reps)
    err = _rel(dplr.delta_rule(nq, nk, nv, nb)[0], dplr.delta_rule(q64, k64, v64, b64)[0])
    rows.append(Row(SUITE, "forward float64, NumPy", size, "dplr PyTorch float64", t_torch, t_np,
                    err, None, "", {"T": T, "method": "chunked"}))  # fmt: skip
    return rows


if __name__ == "__main__":
    print(format_table(run(progress=print)))
