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
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of rows: case, size, baseline, times, ratio, target, error."""
    head = "| case | size | baseline | baseline (ms) | dplr (ms) | ratio | target | error |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = f">= {r.target:g}x" if r.target is not None else "report"
        lines.append(
            f"| {r.case} | {r.size} | {r.baseline} | {1e3 * r.baseline_s:.2f} | "
            f"{1e3 * r.dplr_s:.2f} | {r.ratio:.2f}x | {target} | {r.error:.1e} |"
        )
    return "\n".join(lines)


def noop_progress(message: str) -> None:
    """The default progress callback: say nothing."""
