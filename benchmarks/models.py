"""Shapes of released models: decode steps, short blocks and prefill, against transformers.

PyTorch on the CPU, float32, B = 1, H = 32 heads, K = V = 128 (the linear
attention layers of Qwen3-Next-sized models), queries and keys normalised
inside the call as those models do.  The baselines are the pure-torch
functions the transformers library runs on a CPU:

- one decode step (T = 1, with a state) against
  ``torch_recurrent_gated_delta_rule``;
- short blocks of T tokens: dplr's compiled token recurrence against dplr's
  chunked algorithm, the table the automatic choice is set from;
- prefill (no state) against ``torch_chunk_gated_delta_rule``, with the
  achieved GFLOP/s and the rate of a 1024^2 matrix product in the same run;
- forward + backward against 3.5 x the forward at the prefill shape;
- KDA forward (per-channel decay in [-5, 0), T = 2048, H = 16) against
  ``recurrent_kimi_delta_attention`` (the token recurrence) and
  ``chunk_kimi_delta_attention``, with the peak memory of both forwards.

Run ``python -m dplr_bench.models``.
"""

from __future__ import annotations

import dplr

from ._common import (
    Progress,
    Row,
    by_mode,
    delta_rule_flops,
    format_table,
    matmul_gflops,
    median_times,
    noop_progress,
    peak_memory_mib,
    rel_error,
)  # fmt: skip

SUITE = "models"
H, K, V = 32, 128, 128
SIZE = f"B=1 H={H} K=V={K}"


def make_inputs(T: int, seed: int = 0, state: bool = False):
    """Torch float32 tensors [B, T, H, .]: raw q and k (normalised in the call), g <= 0, beta."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.randn(1, T, H, K, generator=gen)
    v = torch.randn(1, T, H, V, generator=gen)
    g = -torch.rand(1, T, H, generator=gen) * 0.5
    beta = torch.rand(1, T, H, generator=gen)
    s0 = torch.randn(1, H, K, V, generator=gen) * 0.1 if state else None
    return q, k, v, g, beta, s0


def _transformers():
    """The library's pure-torch functions, with its fallback warning silenced."""
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen
    from transformers.utils import logging

    logging.set_verbosity_error()
    return qwen.torch_recurrent_gated_delta_rule, qwen.torch_chunk_gated_delta_rule


def _dplr(q, k, v, g, beta, s0, method="auto"):
    return dplr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                 use_qk_l2norm=True, method=method)  # fmt: skip


def _theirs(fn, q, k, v, g, beta, s0):
    return fn(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True,
              use_qk_l2norm_in_kernel=True)  # fmt: skip


def decode_row(torch, reps: int) -> Row:
    recurrent_fn, _ = _transformers()
    args = make_inputs(1, state=True)
    with torch.no_grad():
        o, s = _dplr(*args)
        o_ref, s_ref = _theirs(recurrent_fn, *args)
        t_ref, t_ours = median_times(
            [lambda: _theirs(recurrent_fn, *args), lambda: _dplr(*args)], reps
        )
    err = max(rel_error(o, o_ref), rel_error(s, s_ref))
    return Row(SUITE, "decode step (T=1, with state)", SIZE,
               "transformers torch_recurrent_gated_delta_rule", t_ref, t_ours, err, 2.0,
               f"{t_ours * 1e6:.0f} us per step against {t_ref * 1e6:.0f} us",
               {"T": 1, "method": "recurrent"})  # fmt: skip


def crossover_rows(torch, lengths, reps: int) -> list[Row]:
    """dplr's recurrence against dplr's chunked algorithm over T (with a state)."""
    rows = []
    for T in lengths:
        args = make_inputs(T, seed=T, state=True)

        def recurrent(args=args):
            return _dplr(*args, method="recurrent")

        def chunked(args=args):
            return _dplr(*args, method="chunked")

        with torch.no_grad():
            t_chunked, t_rec = median_times([chunked, recurrent], reps)
            o_rec = recurrent()[0]
            err = rel_error(o_rec, chunked()[0])
            # the compiled loops are deterministic: auto's choice shows in the bits
            auto = "recurrence" if torch.equal(_dplr(*args)[0], o_rec) else "chunked"
        rows.append(Row(SUITE, f"short block T={T}", SIZE, "dplr chunked algorithm", t_chunked,
                        t_rec, err, None, f"auto runs the {auto}",
                        {"T": T, "plot": "models_crossover", "method": "recurrent",
                         "auto": auto}))  # fmt: skip
    return rows


def prefill_row(torch, T: int, reps: int) -> Row:
    _, chunk_fn = _transformers()
    args = make_inputs(T)
    with torch.no_grad():
        o, s = _dplr(*args)
        o_ref, s_ref = _theirs(chunk_fn, *args)
        t_ref, t_ours = median_times([lambda: _theirs(chunk_fn, *args), lambda: _dplr(*args)],
                                     reps)  # fmt: skip
        mm, _ = matmul_gflops(torch, reps)
    c = min(32, T)  # dplr's documented default chunk size
    gflops = delta_rule_flops(T, H, K, V, c) / t_ours / 1e9
    note = (f"{gflops:.0f} GFLOP/s (chunk {c}) = {gflops / mm:.0%} of a 1024^2 matmul "
            f"in this run ({mm:.0f} GFLOP/s)")  # fmt: skip
    return Row(SUITE, "prefill, gated", f"B=1 T={T} H={H} K=V={K}",
               "transformers torch_chunk_gated_delta_rule", t_ref, t_ours,
               max(rel_error(o, o_ref), rel_error(s, s_ref)), 2.5, note,
               {"T": T, "method": "chunked", "gflops": gflops, "matmul_gflops": mm})  # fmt: skip


def fwd_bwd_row(torch, case: str, size: str, fn, inputs, reps: int, T: int,
                with_loss: bool = False) -> Row:  # fmt: skip
    """``fn(*inputs)`` forward + backward against 3.5 x its forward without gradients.

    The backward is given the outputs' gradients (random, fixed), as a
    model's next layer hands them over, and so times dplr's work only.  With
    ``with_loss``, the note also gives the ratio with the loss
    ``(o^2).sum() + s.sum()`` formed and differentiated in torch on top.
    """

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    o, s = forward()
    gen = torch.Generator().manual_seed(1)
    given = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in (o, s))
    del o, s

    def both():
        o, s = fn(*inputs)
        return torch.autograd.grad((o, s), inputs, given)

    def both_with_loss():
        o, s = fn(*inputs)
        return torch.autograd.grad((o.square().sum() + s.sum(),), inputs)

    fns = [forward, both, both_with_loss] if with_loss else [forward, both]
    t_fwd, t_both, *t_loss = median_times(fns, reps)
    ratio = t_both / t_fwd
    note = f"fwd+bwd = {ratio:.2f} x forward"
    params = {"T": T, "fwd_bwd_over_fwd": ratio, "method": "chunked"}
    if t_loss:
        note += f" ({t_loss[0] / t_fwd:.2f} x with a torch loss (o^2).sum() + s.sum())"
        params["fwd_bwd_with_loss_over_fwd"] = t_loss[0] / t_fwd
    return Row(SUITE, case, size, "3.5 x dplr forward", 3.5 * t_fwd, t_both, None, 1.0, note,
               params)  # fmt: skip


def backward_row(torch, T: int, reps: int) -> Row:
    inputs = tuple(x.requires_grad_() for x in make_inputs(T)[:5])
    return fwd_bwd_row(torch, "fwd+bwd vs 3.5 x forward, gated", f"B=1 T={T} H={H} K=V={K}",
                       lambda *x: _dplr(*x, None), inputs, reps, T, with_loss=True)  # fmt: skip


# ------------------------------------------------------------------------------ KDA
KDA_H = 16


def kda_inputs(T: int, seed: int = 0):
    """KDA inputs [B, T, H, .]: per-channel log decays in [-5, 0) (the models' gate range)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, KDA_H, K, generator=gen)
    k = torch.randn(1, T, KDA_H, K, generator=gen)
    v = torch.randn(1, T, KDA_H, V, generator=gen)
    g = -5.0 * torch.rand(1, T, KDA_H, K, generator=gen)
    beta = torch.rand(1, T, KDA_H, generator=gen)
    return q, k, v, g, beta


def _kda_functions():
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi
    from transformers.utils import logging

    logging.set_verbosity_error()
    return kimi.recurrent_kimi_delta_attention, kimi.chunk_kimi_delta_attention


def _dplr_kda(q, k, v, g, beta):
    return dplr.kda(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True)


def _their_kda(fn, q, k, v, g, beta):
    return fn(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True,
              use_qk_l2norm_in_kernel=True)  # fmt: skip


def kda_rows(torch, T: int, reps: int, memory: bool) -> list[Row]:
    """KDA forward against the library's token recurrence and its chunked fallback.

    With ``memory``, the chunked fallback's row also reports the peak memory
    of both forwards, each in a fresh process.
    """
    recurrent_fn, chunk_fn = _kda_functions()
    args = kda_inputs(T)
    size = f"B=1 T={T} H={KDA_H} K=V={K}"
    rows = []
    with torch.no_grad():
        o, s = _dplr_kda(*args)
        for name, fn, goal in (("recurrent_kimi_delta_attention (token recurrence)",
                                recurrent_fn, 4.0),
                               ("chunk_kimi_delta_attention", chunk_fn, None)):  # fmt: skip
            o_ref, s_ref = _their_kda(fn, *args)
            t_ref, t_ours = median_times(
                [lambda fn=fn: _their_kda(fn, *args), lambda: _dplr_kda(*args)], reps
            )
            rows.append(Row(SUITE, "KDA forward", size, f"transformers {name}", t_ref, t_ours,
                            max(rel_error(o, o_ref), rel_error(s, s_ref)), goal, "",
                            {"T": T, "method": "chunked"}))  # fmt: skip
    if memory:
        ours = peak_memory_mib(_kda_peak_job, "dplr", T)
        theirs = peak_memory_mib(_kda_peak_job, "transformers", T)
        rows[-1].note = f"peak memory (RSS growth) {ours:.0f} MiB against {theirs:.0f} MiB"
        rows[-1].params |= {"peak_mib": ours, "baseline_peak_mib": theirs}
    return rows


def kda_backward_row(torch, T: int, reps: int) -> Row:
    """KDA forward + backward against 3.5 x the forward without gradients (as backward_row)."""
    inputs = tuple(x.requires_grad_() for x in kda_inputs(T))
    return fwd_bwd_row(torch, "KDA fwd+bwd vs 3.5 x forward", f"B=1 T={T} H={KDA_H} K=V={K}",
                       _dplr_kda, inputs, reps, T)  # fmt: skip


def _kda_peak_job(which: str, T: int):
    """For :func:`peak_memory_mib`: one KDA forward (no gradients) of ``which`` at length T."""
    import torch

    args = kda_inputs(T)
    _, chunk_fn = _kda_functions()
    with torch.no_grad():
        _dplr_kda(*(x[:, :96] for x in args))  # compile and warm the code paths

    def run() -> None:
        with torch.no_grad():
            if which == "dplr":
                _dplr_kda(*args)
            else:
                _their_kda(chunk_fn, *args)

    return run


def run(quick: bool = False, progress: Progress | None = None) -> list[Row]:
    """Benchmark rows; ``quick`` uses T = 512 for prefill and fewer repeats (a few seconds)."""
    progress = progress or noop_progress
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        progress(f"{exc.name} is not installed: skipping the model-shape benchmarks")
        return []
    reps = 3 if quick else 7
    progress("models: one decode step against transformers' recurrent step")
    rows = [decode_row(torch, 5 if quick else 15)]
    progress("models: short blocks, recurrence against the chunked algorithm")
    lengths = by_mode((1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), (1, 16, 64, 256), (1, 16))
    rows += crossover_rows(torch, lengths, reps)
    T = by_mode(4096, 512, 64)
    progress(f"models: prefill T={T} against transformers' chunked fallback")
    rows.append(prefill_row(torch, T, reps))
    progress(f"models: forward + backward at T={T}")
    rows.append(backward_row(torch, T, reps))
    if hasattr(dplr, "kda"):
        T = 256 if quick else 2048
        progress(f"models: KDA forward T={T} against transformers' recurrence and chunked form")
        rows += kda_rows(torch, T, 1 if quick else 3, memory=not quick)
        progress(f"models: KDA forward + backward at T={T}")
        rows.append(kda_backward_row(torch, T, 1 if quick else 3))
    return rows


if __name__ == "__main__":
    _rows = run(progress=print)
    print(format_table(_rows))
    for _row in _rows:
        if _row.note:
            print(f"- {_row.case} ({_row.size}, vs {_row.baseline}): {_row.note}")
