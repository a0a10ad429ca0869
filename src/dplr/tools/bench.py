"""Orchestration behind ``python -m dplr bench``: load and run suites, report, save.

The measurements live in the suite modules of ``dplr_bench`` (``benchmarks/``
in the source tree); each exposes ``run(quick, progress)`` returning a list of
``dplr_bench._common.Row``, and ``dplr_bench._common`` formats the tables.
This module imports them (never the other way round), drives a progress
display, prints the tables and writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import dplr_bench
from dplr_bench import _common

MODES = ("full", "quick", "smoke")
"""Sizes of a run: the full suites, ``--quick`` (under a minute) or ``--smoke`` (seconds)."""

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"


@dataclass
class SuiteOutcome:
    """What happened to one suite: its rows, or why it has none.

    ``status`` is ``"ok"``, ``"skipped"`` (module missing, a dependency such
    as torch not installed, or no rows returned; ``note`` says which) or
    ``"failed"`` (the suite raised).
    """

    name: str
    status: str
    note: str = ""
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def classify_import_error(exc: ImportError, suite: str) -> tuple[str, str]:
    """Status and one-line note for an ImportError met while importing or running ``suite``.

    A missing suite module or a missing third-party module (torch, say) is a
    skip; anything else (a name that dplr itself fails to provide) is a bug
    and is reported as a failure.

    Parameters
    ----------
    exc : ImportError
        The error; its ``name`` attribute says which module was being imported.
    suite : str
        The suite's short name (``"core"``, ...).

    Returns
    -------
    status : {"skipped", "failed"}
    note : str
        E.g. ``"needs torch, which is not installed"``.
    """
    name = getattr(exc, "name", None) or ""
    top = name.split(".")[0]
    if name == f"dplr_bench.{suite}":
        return "skipped", f"not available in this version (no module dplr_bench.{suite})"
    if isinstance(exc, ModuleNotFoundError) and top and top not in ("dplr", "dplr_bench"):
        return "skipped", f"needs {top}, which is not installed"
    return "failed", f"{type(exc).__name__}: {exc}"


def load_suite(name: str) -> ModuleType | SuiteOutcome:
    """Import ``dplr_bench.<name>``; on ImportError return the outcome saying why not."""
    try:
        return importlib.import_module(f"dplr_bench.{name}")
    except ImportError as exc:
        return SuiteOutcome(name, *classify_import_error(exc, name))


def suite_names() -> tuple[str, ...]:
    """The suites of ``dplr_bench``, in the order ``--suite all`` runs them."""
    return dplr_bench.suite_names()


def run_suite(
    name: str, mode: str, progress_factory: Callable[[str], ProgressDisplay]
) -> SuiteOutcome:
    """Import and run one suite, turning import problems and errors into an outcome.

    Parameters
    ----------
    name : str
        Suite name, one of :func:`suite_names`.
    mode : {"full", "quick", "smoke"}
        The sizes to run (see :data:`dplr_bench._common.MODE`).
    progress_factory : callable
        ``progress_factory(name)`` returns the progress display for this suite.

    Returns
    -------
    SuiteOutcome
        Never raises for a suite's own failure: ``status`` says what happened.
    """
    module = load_suite(name)
    if isinstance(module, SuiteOutcome):
        return module
    display = progress_factory(name)
    start = time.perf_counter()
    # A quick run times one series per measurement, a full run the best of three.
    _common.configure(mode)
    try:
        rows = module.run(quick=mode != "full", progress=display)
    except ImportError as exc:
        return SuiteOutcome(name, *classify_import_error(exc, name))
    except Exception as exc:
        return SuiteOutcome(name, "failed", f"{type(exc).__name__}: {exc}")
    finally:
        display.close()
        _common.configure("full")
    seconds = time.perf_counter() - start
    if not rows:
        said = f": {display.last}" if display.last else ""
        return SuiteOutcome(name, "skipped", f"it returned no rows{said}", seconds)
    return SuiteOutcome(name, "ok", "", seconds, [row.as_dict() for row in rows])


class ProgressDisplay:
    """The ``progress`` callback handed to a suite: a tqdm bar, or plain lines.

    A suite calls it with a message before each measurement.  On a terminal
    with tqdm installed, the bar counts finished measurements and shows the
    current one; otherwise each message becomes one line ``[suite] message``.

    Parameters
    ----------
    suite : str
        Shown in front of every message.
    stream : text stream
        Where the display goes (standard error by default).
    bar : bool, optional
        Force the bar on or off; default: on if ``stream`` is a TTY and tqdm
        can be imported.
    """

    def __init__(self, suite: str, stream: TextIO | None = None, bar: bool | None = None):
        self.suite = suite
        self.stream = sys.stderr if stream is None else stream
        self.count = 0
        self.last = ""
        self._bar = self._make_bar() if (bar is None and self._is_tty()) or bar else None

    def _is_tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _make_bar(self) -> Any:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(desc=self.suite, unit="case", file=self.stream, leave=False)

    def __call__(self, message: str) -> None:
        self.last = message
        if self._bar is None:
            print(f"[{self.suite}] {message}", file=self.stream, flush=True)
        else:
            if self.count:
                self._bar.update(1)
            self._bar.set_postfix_str(message, refresh=True)
        self.count += 1

    def close(self) -> None:
        """Finish the bar (counting the last measurement)."""
        if self._bar is not None:
            if self.count:
                self._bar.update(1)
            self._bar.close()
            self._bar = None


def _version(module: str) -> str | None:
    """``module.__version__`` if it imports, else None (torch absent, say)."""
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return None


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, platform and library versions, and the date (UTC, ISO 8601)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cores": len(affinity(0)) if affinity else os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("numpy", "scipy", "torch", "dplr")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine and versions, for plot footnotes and headers."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v is not None)
    day = machine["date"][:10]
    return f"{machine['cores']} cores ({machine['cpu']}); {versions}; {day}"


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Inf: replace non-finite floats (recursively) by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def results_document(
    outcomes: Sequence[SuiteOutcome], machine: dict[str, Any], mode: str
) -> dict[str, Any]:
    """The content of ``results.json``: machine, mode, per-suite status, and all rows."""
    return _finite_or_none(
        {
            "machine": machine,
            "mode": mode,
            "suites": {
                o.name: {"status": o.status, "note": o.note, "seconds": o.seconds} for o in outcomes
            },
            "rows": [row for o in outcomes for row in o.rows],
        }
    )


def write_results(document: dict[str, Any], out: Path) -> Path:
    """Write ``document`` to ``out / results.json`` (strict JSON) and ``out / results.md``
    (the same tables in Markdown, for pasting into documentation); return the JSON path."""
    path = out / RESULTS_FILE
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / MARKDOWN_FILE).write_text(markdown_report(document), encoding="utf-8")
    return path


def markdown_report(document: dict[str, Any]) -> str:
    """The machine line and one Markdown table per suite that ran."""
    mode = document.get("mode", "full")
    flag = "" if mode == "full" else f" (`--{mode}`)"
    parts = [f"Measured on {machine_line(document['machine'])}{flag}."]
    for name, info in document["suites"].items():
        rows = [r for r in document["rows"] if r.get("suite") == name]
        if rows:
            parts.append(f"**{name}**\n\n{_common.format_table(rows)}")
        else:
            parts.append(f"**{name}**: {info['status']}. {info.get('note') or ''}".rstrip())
    parts.append(_common.LEGEND + ".")
    return "\n\n".join(parts) + "\n"


def format_outcome(outcome: SuiteOutcome) -> str:
    """A suite's heading and table, or its one-line reason for having none."""
    if outcome.status == "skipped":
        return f"suite {outcome.name}: skipped, {outcome.note}"
    if outcome.status == "failed":
        return f"suite {outcome.name}: FAILED, {outcome.note}"
    title = f"suite {outcome.name} ({len(outcome.rows)} rows, {outcome.seconds:.1f} s)"
    if not outcome.rows:
        return f"{title}: no rows"
    return f"{title}\n{_common.format_table(outcome.rows, markdown=False)}"
