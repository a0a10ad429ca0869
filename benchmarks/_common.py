"""Timing, rows and tables shared by every benchmark suite.

A suite module of this package exposes ``run(quick=False, progress=None)``
returning a list of :class:`Row`; it measures with :func:`median_times`,
picks its sizes with :func:`by_mode` and uses dplr's public API only.
``python -m dplr bench`` (:mod:`dplr.tools.bench`) imports the suites and
this module; nothing here imports the command line.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

Progress = Callable[[str], None]
Size = TypeVar("Size")


@dataclass
class Row:
    """One benchmark comparison: dplr against a baseline on the same problem.

    ``baseline`` names the baseline by what it is (``"scipy solve_triangular
    on the dense T"``); ``params`` holds the numeric problem sizes (n, d, N,
    M, T, ...) that plots use.  ``error`` is the max-norm relative difference
    (:func:`rel_error`) between dplr's result and one computed without dplr:
    the baseline's, or a NumPy/SciPy or :mod:`dplr.reference` result where
    the baseline is dplr itself or computes something else (a matrix product
    of equal flops, another chunk size); None leaves the table cell empty.
    ``target`` is the ratio this row is expected to reach, kept in
    ``results.json`` as ``"goal"`` (None: no expectation) and not printed.
    """

    suite: str
    case: str
    size: str
    baseline: str
    baseline_s: float
    dplr_s: float
    error: float | None
    target: float | None = None
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.baseline_s / self.dplr_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["goal"] = out.pop("target")
        out["ratio"] = self.ratio
        return out


def rel_error(actual: Any, expected: Any) -> float:
    """``max|a - e| / max|e|`` in float64 (NumPy arrays or torch tensors)."""
    a, e = (
        np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
        for x in (actual, expected)
    )
    return float(np.abs(a - e).max(initial=0.0) / max(np.abs(e).max(initial=0.0), 1e-300))


#: The size of a run: ``"full"``, ``"quick"`` (``bench --quick``, under a
#: minute in all) or ``"smoke"`` (tiny sizes and single samples, to check in
#: a few seconds that every suite runs; its timings mean nothing).
MODE = "full"


def by_mode(full: Size, quick: Size, smoke: Size | None = None) -> Size:
    """The value for the current :data:`MODE` (``smoke`` defaults to ``quick``)."""
    if MODE == "smoke" and smoke is not None:
        return smoke
    return full if MODE == "full" else quick


#: Each reported time is the lowest of this many medians, taken one after
#: another.  On the shared 2-core VM the benchmarks ran on, the same call
#: varies up to 2x between seconds (other tenants), so a single median of a
#: short series measured the neighbours as often as the code; baselines and
#: dplr get the same treatment.  ``python -m dplr bench --quick`` uses 1.
SERIES = 3

#: Default settling pause before a timed call (see :func:`median_times`).
SETTLE = 0.15


def configure(quick: bool | str) -> None:
    """Set :data:`MODE` and the timing settings: ``"full"`` (also ``False``), ``"quick"``
    (also ``True``: one series, short pauses) or ``"smoke"`` (one sample, no pauses)."""
    global MODE, SERIES, SETTLE, WAKE_UP, MIN_SAMPLE
    MODE = {True: "quick", False: "full"}.get(quick, quick)  # type: ignore[arg-type]
    if MODE not in ("full", "quick", "smoke"):
        raise ValueError(f"mode must be 'full', 'quick' or 'smoke', got {quick!r}")
    SERIES, SETTLE = {"full": (3, 0.15), "quick": (1, 0.02), "smoke": (1, 0.0)}[MODE]
    WAKE_UP, MIN_SAMPLE = (0.0, 0.0) if MODE == "smoke" else (0.005, 0.005)


#: Seconds of untimed calls after a settling pause (see :func:`median_times`).
WAKE_UP = 0.005


def _wake_up(fn: Callable[[], object]) -> None:
    """Call ``fn`` untimed until :data:`WAKE_UP` seconds have passed (at least once)."""
    end = time.perf_counter() + WAKE_UP
    fn()
    while time.perf_counter() < end:
        fn()


#: Shortest timed sample: faster calls are repeated within one sample, like
#: :mod:`timeit`'s ``number`` (a single 0.05 ms call varied by 60% between
#: samples, a loop of 5 ms of them by a few percent).
MIN_SAMPLE = 0.005


def _loops_per_sample(fn: Callable[[], object]) -> int:
    """How many calls of ``fn`` make a sample of at least :data:`MIN_SAMPLE` seconds."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE / max(once, 1e-7)))


def median_time(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, settle: float = 0.0
) -> float:
    """Seconds per call of ``fn()``: the lowest of :data:`SERIES` medians of
    ``repeats`` samples, after ``warmup`` runs (a sample is one call, or a loop
    of calls lasting at least :data:`MIN_SAMPLE`).

    Like :mod:`timeit`, the garbage collector is run once and then disabled
    for the runs (a full collection takes ~0.1 s once torch is imported; one
    per run made the quick suites several times slower without changing a
    single timing).  ``settle`` seconds of sleep come first: OpenBLAS worker
    threads keep spinning for a while after a multi-threaded call (a dense
    baseline timed just before) and would take the cores from ``fn``.
    """
    return median_times([fn], repeats, warmup, settle, first_settle_only=True)[0]


def median_times(
    fns: Sequence[Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    settle: float | None = None,
    *,
    first_settle_only: bool = False,
    once_above: float | None = None,
) -> list[float]:
    """Seconds per call of each of ``fns`` as in :func:`median_time`, their runs alternating.

    Round after round every function gives one sample (A B A B ...), so that
    slow phases of the machine fall on all of them alike.  Before each
    sample (only the first with ``first_settle_only``) the process sleeps
    ``settle`` seconds (default :data:`SETTLE`): OpenBLAS worker threads
    busy-wait for about 0.1 s after a multi-threaded call, and would
    otherwise take the cores from whatever is timed next.  After each such
    pause the function runs untimed for :data:`WAKE_UP` seconds: calls right
    after a sleep run on cores that are still waking up (a sleep before
    every call made a 0.1 ms function 3-4x slower).

    With ``once_above``, a function whose first call took longer than that
    many seconds is timed by one more call instead (a slow baseline need
    not be run dozens of times to be known to be slow).  In the ``"smoke"``
    mode every function is called once untimed and once timed, no pauses.
    """
    if MODE == "smoke":
        repeats, warmup, settle = 1, 0, 0.0
    settle = SETTLE if settle is None else settle
    time.sleep(settle)
    slow: dict[int, float] = {}
    if once_above is not None:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if time.perf_counter() - start > once_above:
                slow[i] = _one_call(fn)
        warmup = max(0, warmup - 1)
    fast = [fn for i, fn in enumerate(fns) if i not in slow]
    times = iter(_alternating(fast, repeats, warmup, settle, first_settle_only) if fast else [])
    return [slow[i] if i in slow else next(times) for i in range(len(fns))]


def _one_call(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``, the garbage collector held off."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _alternating(
    fns: Sequence[Callable[[], object]],
    repeats: int,
    warmup: int,
    settle: float,
    first_settle_only: bool,
) -> list[float]:
    """The alternating series of :func:`median_times`; the lowest median of each function."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    loops = [1 if MODE == "smoke" else _loops_per_sample(fn) for fn in fns]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        best = [float("inf")] * len(fns)
        for _ in range(SERIES):
            times: list[list[float]] = [[] for _ in fns]
            samples = list(zip(fns, loops, times, strict=True)) * repeats
            for fn, number, series in samples:
                if settle and not first_settle_only:
                    time.sleep(settle)
                    _wake_up(fn)
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                series.append((time.perf_counter() - start) / number)
            best = [min(b, statistics.median(t)) for b, t in zip(best, times, strict=True)]
    finally:
        if enabled:
            gc.enable()
    return best


# ------------------------------------------------------------------------ tables
#: The columns of every table, in the terminal and in ``results.md``.
HEADER = ("case", "size", "baseline", "baseline ms", "dplr ms", "ratio", "error")

#: What the columns mean, printed under the tables.
LEGEND = (
    "ratio = baseline time / dplr time, both measured in this run (> 1: dplr is faster); "
    "error = largest difference between dplr's result and one computed without dplr (the "
    "baseline's, or NumPy/SciPy or the token recurrence where the baseline is no such "
    "result), relative to the largest entry; empty where no such result was computed"
)


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.4g}"


def _cells(row: dict[str, Any]) -> list[str]:
    ratio, error = row.get("ratio"), row.get("error")
    return [
        str(row["case"]),
        str(row["size"]),
        str(row["baseline"]),
        _ms(row.get("baseline_s")),
        _ms(row.get("dplr_s")),
        "-" if ratio is None else f"{ratio:.2f}x",
        "" if error is None else f"{error:.1e}",
    ]


def _as_dicts(rows: Iterable[Row | dict[str, Any]]) -> list[dict[str, Any]]:
    return [r.as_dict() if isinstance(r, Row) else r for r in rows]


def format_table(rows: Iterable[Row | dict[str, Any]], markdown: bool = True) -> str:
    """The rows as a table: Markdown (``results.md``) or aligned plain text (the terminal).

    Parameters
    ----------
    rows : iterable of Row or dict
        Rows, or their dicts as in ``results.json``.
    markdown : bool
        Markdown with a ``note`` column; else columns padded to equal width
        (numbers to the right) with each note on a line of its own below its row.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    rows = _as_dicts(rows)
    cells = [_cells(r) for r in rows]
    if markdown:
        lines = [
            "| " + " | ".join((*HEADER, "note")) + " |",
            "|---|---|---|" + "---:|" * 4 + "---|",
        ]
        for line, row in zip(cells, rows, strict=True):
            lines.append("| " + " | ".join([*line, str(row.get("note") or "")]) + " |")
        return "\n".join(lines)
    table = [list(HEADER), *cells]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]

    def fmt(line: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(line[:3], widths[:3], strict=True)]
        right = [c.rjust(w) for c, w in zip(line[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    lines = [fmt(table[0]), "  ".join("-" * w for w in widths)]
    for line, row in zip(cells, rows, strict=True):
        lines.append(fmt(line))
        if row.get("note"):
            lines.append(f"    note: {row['note']}")
    return "\n".join(lines)


def noop_progress(message: str) -> None:
    """The default progress callback: say nothing."""


# ------------------------------------------------------------- shared figures
def delta_rule_flops(T: int, heads: int, d: int, m: int, c: int) -> float:
    """Flops of dplr's chunked delta-rule forward at chunk size ``c`` (docs/delta.md).

    The solve for the new values (docs/algorithms.md): strict lower blocks
    ``T c d``, substitutions with them ``T c m``, two state products per chunk
    ``4 T d m``; then the output from the states: the causal blocks ``T c d``,
    their product with the values ``T c m``, the state product ``2 T d m``.
    Triangular block products are counted at their triangular cost; ``d``,
    ``m`` are the key and value widths, summed over ``heads``.
    """
    per_head = 2 * T * c * (d + m) + 6 * T * d * m
    return float(heads * per_head)


def matmul_gflops(torch: Any, repeats: int) -> tuple[float, float]:
    """GFLOP/s of one 1024^2 float32 product and of 512 batched 64^3 products, timed now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big = 2 * 1024**3 / median_time(lambda: a @ b, repeats) / 1e9
    x, y = torch.randn(512, 64, 64), torch.randn(512, 64, 64)
    small = 2 * 512 * 64**3 / median_time(lambda: x @ y, repeats) / 1e9
    return big, small


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(setup: Callable[..., Callable[[], object]], args: tuple, conn: Any) -> None:
    run = setup(*args)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_mib("VmRSS")
    run()
    conn.send(_status_mib("VmHWM") - before)
    conn.close()


def peak_memory_mib(setup: Callable[..., Callable[[], object]], *args: Any) -> float:
    """Growth of the peak RSS (MiB) over one call, measured in a fresh process.

    In a spawned process ``setup(*args)`` makes the inputs, warms the code
    paths and returns the call to measure; the peak (VmHWM) is then reset
    (``clear_refs`` 5, Linux), so that neither the imports, the inputs nor
    compilation count.  ``setup`` must be a module-level function (it is
    pickled by name).
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_child, args=(setup, args, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return float(value)
