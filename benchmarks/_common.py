"""Timing and reporting shared by every benchmark suite."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
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


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    Like :mod:`timeit`, the garbage collector is run once and then disabled
    for the runs (a full collection takes ~0.1 s once torch is imported; one
    per run made the quick suites several times slower without changing a
    single timing).
    """
    for _ in range(warmup):
        fn()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return statistics.median(times)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of rows (the same table ``python -m dplr bench`` writes)."""
    from dplr._bench import format_markdown_table

    return format_markdown_table(r.as_dict() for r in rows)


def noop_progress(message: str) -> None:
    """The default progress callback: say nothing."""
