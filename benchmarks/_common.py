"""Timing and reporting shared by every benchmark suite."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Progress = Callable[[str], None]


@dataclass
class Row:
    """One benchmark comparison: dplr against a baseline on the same problem.

    ``params`` holds the numeric problem sizes (n, d, N, M, T, ...) that plots
    use; ``error`` is the difference between dplr's result and the baseline's
    (relative, max-norm, unless ``note`` says otherwise); ``target`` the ratio
    an issue asks for (None if it only asks to report).
    """

    suite: str
    case: str
    size: str
    baseline: str
    baseline_s: float
    dplr_s: float
    error: float
    target: float | None = None
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.baseline_s / self.dplr_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


#: Each reported time is the lowest of this many medians, taken one after
#: another.  On the shared 2-core VM the benchmarks ran on, the same call
#: varies up to 2x between seconds (other tenants), so a single median of a
#: short series measured the neighbours as often as the code; baselines and
#: dplr get the same treatment.  ``python -m dplr bench --quick`` uses 1.
SERIES = 3

#: Default settling pause before a timed call (see :func:`median_times`).
SETTLE = 0.15


def configure(quick: bool) -> None:
    """Settings of a quick run (one series, short pauses) or a full one."""
    global SERIES, SETTLE
    SERIES, SETTLE = (1, 0.02) if quick else (3, 0.15)


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
    """
    settle = SETTLE if settle is None else settle
    time.sleep(settle)
    for fn in fns:
        for _ in range(warmup):
            fn()
    loops = [_loops_per_sample(fn) for fn in fns]
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


def format_table(rows: list[Row]) -> str:
    """A Markdown table of rows (the same table ``python -m dplr bench`` writes)."""
    from dplr.tools.bench import format_markdown_table

    return format_markdown_table(r.as_dict() for r in rows)


def noop_progress(message: str) -> None:
    """The default progress callback: say nothing."""
