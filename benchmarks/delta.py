"""Delta rule: dplr's chunked form against the token recurrence and a naive chunked form.

PyTorch on the CPU, float32, B = 1, H = 8, K = V = 64:

- forward, T = 4096, against the token-by-token recurrence
  (:func:`dplr.reference.delta_rule_recurrent`) and against a chunked form
  that builds each chunk's inverse by row-by-row forward substitution; the
  achieved GFLOP/s against one large matrix product;
- forward + backward against 3.5 x the forward, and against the recurrence
  under autograd, with the peak memory of each (in a fresh process);
- throughput (tokens per second) against T;
- NumPy float64 against PyTorch float64.

Run ``python -m dplr bench --suite delta`` (or ``python -m dplr_bench.delta``).
"""

from __future__ import annotations

import time

import dplr
from dplr.reference import delta_rule_recurrent

from ._common import (
    Progress,
    Row,
    by_mode,
    delta_rule_flops,
    format_table,
    matmul_gflops,
    median_time,
    median_times,
    noop_progress,
    peak_memory_mib,
    rel_error,
)

SUITE = "delta"
H, K, V = 8, 64, 64

#: dplr's documented default chunk size, passed explicitly so that the flops
#: counted are those of the algorithm that ran.
CHUNK = 32

#: Tokens per chunk of the naive chunked form (its usual setting).
NAIVE_CHUNK = 64

RECURRENCE = "PyTorch token-by-token recurrence (all heads at once)"
NAIVE = f"PyTorch chunked form, each chunk's inverse row by row (c={NAIVE_CHUNK})"


# ------------------------------------------------------------------ baselines
def recurrent(q, k, v, beta):
    """The token recurrence of :mod:`dplr.reference`, in the public layout, default scale."""
    return delta_rule_recurrent(q, k, v, beta)


def naive_chunked(q, k, v, beta, scale, c=NAIVE_CHUNK):
    """The textbook chunked form, (B, H, T, .) layout: each chunk's inverse by
    forward substitution, row by row; T a multiple of ``c``."""
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


# ---------------------------------------------------------------- peak memory
def _peak_job(which: str, T: int):
    """For :func:`peak_memory_mib`: one forward + backward of ``which`` at length T."""
    import torch

    q, k, v, beta = (x.requires_grad_() for x in make_inputs(T))
    dplr.delta_rule(q[:, :64], k[:, :64], v[:, :64], beta[:, :64])  # warm up the code paths
    forward = dplr.delta_rule if which == "chunked" else recurrent

    def run() -> None:
        o, _ = forward(q, k, v, beta)
        torch.autograd.grad((o.sum(),), (q, k, v, beta))

    return run


# ---------------------------------------------------------------------- suite
def _grads(torch, o, s, inputs, given):
    """Gradients of the inputs, given those of the outputs (o, s)."""
    return torch.autograd.grad((o, s), inputs, given)


def _size(T: int) -> str:
    return f"B=1 T={T} H={H} K=V={K}"


def _forward_rows(torch, T: int, reps: int) -> list[Row]:
    q, k, v, beta = make_inputs(T)
    hq, hk, hv, hb = _heads_first(q, k, v, beta)
    scale = K**-0.5
    c = min(CHUNK, T)
    with torch.no_grad():
        o, _ = dplr.delta_rule(q, k, v, beta, chunk_size=c)
        o_rec, _ = recurrent(q, k, v, beta)
        o_naive, _ = naive_chunked(hq, hk, hv, hb, scale, min(NAIVE_CHUNK, T))
        t_ours, t_rec, t_naive = median_times(
            [lambda: dplr.delta_rule(q, k, v, beta, chunk_size=c),
             lambda: recurrent(q, k, v, beta),
             lambda: naive_chunked(hq, hk, hv, hb, scale, min(NAIVE_CHUNK, T))],
            reps, settle=0.0,
        )  # fmt: skip
        big, small = matmul_gflops(torch, reps)
    gflops = delta_rule_flops(T, H, K, V, c) / t_ours / 1e9
    note = (
        f"dplr at chunk_size={c}: {gflops:.0f} GFLOP/s = {gflops / big:.0%} of one 1024^2 "
        f"matmul ({big:.0f} GFLOP/s); batched 64^3 products: {small:.0f} GFLOP/s"
    )
    params = {"T": T, "tokens_per_s": T / t_ours, "method": "chunked", "gflops": gflops,
              "matmul_gflops": big, "bmm64_gflops": small}  # fmt: skip
    return [
        Row(SUITE, "forward float32", _size(T), RECURRENCE, t_rec, t_ours,
            rel_error(o, o_rec), 15.0, note, params),
        Row(SUITE, "forward float32", _size(T), NAIVE, t_naive, t_ours,
            rel_error(o.transpose(1, 2), o_naive), 3.0, "", params),
    ]  # fmt: skip


def _backward_rows(torch, T: int, reps: int, memory: bool) -> list[Row]:
    ours_in = [x.requires_grad_() for x in make_inputs(T)]
    rec_in = [x.detach().clone().requires_grad_() for x in ours_in]
    with torch.no_grad():  # the outputs' gradients: random, as a model's next layer gives them
        shapes = [x.shape for x in dplr.delta_rule(*ours_in, output_final_state=True)]
    gen = torch.Generator().manual_seed(1)
    given = tuple(torch.randn(shape, generator=gen) for shape in shapes)

    def ours():
        o, s = dplr.delta_rule(*ours_in, output_final_state=True)
        return _grads(torch, o, s, ours_in, given)

    def rec():
        o, s = recurrent(*rec_in)
        return _grads(torch, o, s, rec_in, given)

    start = time.perf_counter()  # one run of the recurrence: seconds under autograd
    want = rec()
    t_rec = time.perf_counter() - start
    err = max(rel_error(a, b) for a, b in zip(ours(), want, strict=True))

    def forward():
        with torch.no_grad():
            return dplr.delta_rule(*ours_in, output_final_state=True)

    t_fwd, t_fb = median_times([forward, ours], 2 * reps, settle=0.0)
    ratio = t_fb / t_fwd
    rows = [
        Row(SUITE, "fwd+bwd float32 against 3.5 x forward", _size(T), "3.5 x dplr's forward",
            3.5 * t_fwd, t_fb, err, 1.0, f"fwd+bwd = {ratio:.2f} x forward; error of the "
            "gradients against the recurrence under autograd",
            {"T": T, "fwd_bwd_over_fwd": ratio, "method": "chunked"}),
    ]  # fmt: skip
    note, mem = "", {}
    if memory:
        mem = {"peak_mib": peak_memory_mib(_peak_job, "chunked", T),
               "baseline_peak_mib": peak_memory_mib(_peak_job, "recurrent", T)}  # fmt: skip
        note = (
            f"peak memory (RSS growth) {mem['peak_mib']:.0f} MiB vs "
            f"{mem['baseline_peak_mib']:.0f} MiB for the recurrence"
        )
    params = {"T": T, "method": "chunked", **mem}
    rows.append(Row(SUITE, "fwd+bwd float32", _size(T), f"{RECURRENCE}, under autograd",
                    t_rec, t_fb, err, None, note, params))  # fmt: skip
    return rows


def _throughput_rows(torch, lengths) -> list[Row]:
    """One row per T: tokens per second of the chunked form and of the recurrence."""
    rows = []
    for n in lengths:
        q, k, v, beta = make_inputs(n)
        with torch.no_grad():
            t_c = median_time(lambda q=q, k=k, v=v, b=beta: dplr.delta_rule(q, k, v, b), 3)
            start = time.perf_counter()  # one run: the recurrence alone takes seconds at T = 65536
            o_rec, _ = recurrent(q, k, v, beta)
            t_r = time.perf_counter() - start
            err = rel_error(dplr.delta_rule(q, k, v, beta)[0], o_rec)
        rows.append(Row(SUITE, "throughput", _size(n), RECURRENCE, t_r, t_c, err, None,
                        f"{n / t_c:,.0f} tokens/s (recurrence {n / t_r:,.0f})",
                        {"plot": "delta_tokens", "T": n, "H": H, "K": K, "V": V,
                         "chunked_tok_s": n / t_c, "recurrent_tok_s": n / t_r}))  # fmt: skip
    return rows


def _numpy_row(torch, T: int, reps: int) -> Row:
    """dplr on NumPy arrays against dplr on torch tensors; the error against the
    float64 recurrence on the NumPy arrays."""
    q, k, v, beta = make_inputs(T, "float64")
    arrays = [x.numpy() for x in (q, k, v, beta)]
    with torch.no_grad():
        t_torch, t_np = median_times(
            [lambda: dplr.delta_rule(q, k, v, beta), lambda: dplr.delta_rule(*arrays)],
            reps, settle=0.0,
        )  # fmt: skip
    err = rel_error(dplr.delta_rule(*arrays)[0], recurrent(*arrays)[0])
    return Row(SUITE, "forward float64, NumPy", _size(T), "dplr on PyTorch float64 tensors",
               t_torch, t_np, err, None, "error against the NumPy token recurrence",
               {"T": T, "method": "chunked"})  # fmt: skip


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """Benchmark rows; ``quick`` uses T = 512 (and T up to 2048 for the throughput)
    and fewer repeats; the smoke mode T = 32."""
    progress = progress or noop_progress
    try:
        import torch
    except ImportError:
        progress("torch is not installed: skipping the delta-rule benchmarks (all use torch)")
        return []
    reps = by_mode(5, 3)
    T = by_mode(4096, 512, 32)
    progress("delta: forward against the recurrence and the naive chunked form")
    rows = _forward_rows(torch, T, reps)
    memory = by_mode(True, False)
    progress("delta: forward + backward" + (", peak memory in fresh processes" if memory else ""))
    rows += _backward_rows(torch, T, reps, memory)
    progress("delta: throughput against T")
    lengths = by_mode((1024, 4096, 16384, 65536), (256, 512, 1024, 2048), (8, 16, 32))
    rows += _throughput_rows(torch, lengths)
    progress("delta: NumPy float64 against PyTorch float64")
    rows.append(_numpy_row(torch, T, reps))
    return rows


if __name__ == "__main__":
    print(format_table(run(progress=print)))
