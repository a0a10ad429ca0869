"""The command line: ``python -m dplr bench`` and ``python -m dplr demo``.

``bench`` runs the benchmark suites of ``dplr_bench`` (the ``benchmarks/``
folder), prints their tables and writes ``results.json``, ``results.md`` and
PNG plots;
``demo`` runs the sliding-window Gaussian-process regression of
:mod:`dplr.tools.demo`.  Both are thin: the work is in :mod:`dplr.tools.bench`,
:mod:`dplr.tools.plots` and :mod:`dplr.tools.demo`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dplr_bench import _common

from .. import __version__
from . import bench as _bench

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dplr`` (subcommands ``bench`` and ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="python -m dplr",
        description="dplr: benchmarks and a demo of diagonal-plus-low-rank linear algebra.",
    )
    parser.add_argument("--version", action="version", version=f"dplr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo}")

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suites, print tables, write results and plots",
        description="Run dplr's benchmark suites against their baselines; print "
        "tables; write results.json, results.md (the tables in Markdown) and PNG "
        "plots to --out.",
    )
    bench.add_argument(
        "--suite",
        choices=(*_bench.suite_names(), "all"),
        default="all",
        help="which suite to run (default: all)",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one sample each: checks in seconds that every suite runs "
        "(its timings mean nothing)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("dplr-bench"),
        metavar="DIR",
        help="folder for results.json, results.md and the plots (default: ./dplr-bench/)",
    )

    demo = sub.add_parser(
        "demo",
        help="sliding-window GP regression on Mauna Loa CO2 with Cholesky insert/delete",
        description="One-step-ahead Gaussian-process prediction of the weekly Mauna "
        "Loa CO2 series with a sliding window, updating the Cholesky factor "
        "(dplr.cholesky_insert / dplr.cholesky_delete) against refactorising "
        "it at every step.",
    )
    demo.add_argument(
        "--window",
        type=_positive_int,
        default=500,
        metavar="W",
        help="observations in the window (default: 500)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="S",
        help="stop after S steps (default: slide through the whole series)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("dplr-demo"),
        metavar="DIR",
        help="folder for the plot (default: ./dplr-demo/)",
    )
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _torch_available() -> bool:
    """True if ``import torch`` would work (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def cmd_bench(suite: str, mode: str, out: Path) -> int:
    """Run ``python -m dplr bench``; return the exit code (1 if a suite failed)."""
    names = _bench.suite_names() if suite == "all" else (suite,)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"cannot create the output folder {out}: {exc.strerror}")
        return 1
    if not _torch_available():
        print("note: torch is not installed; suites skip their torch rows")
    machine = _bench.machine_info()
    print(f"machine: {_bench.machine_line(machine)}")
    start = time.perf_counter()
    outcomes = []
    for name in names:
        outcome = _bench.run_suite(name, mode, _bench.ProgressDisplay)
        outcomes.append(outcome)
        print()
        print(_bench.format_outcome(outcome), flush=True)
    print()
    print(_common.LEGEND)
    document = _bench.results_document(outcomes, machine, mode)
    try:
        path = _bench.write_results(document, out)
        markdown = path.with_name(_bench.MARKDOWN_FILE)
        print(f"results: {path}, and the tables in Markdown: {markdown}")
    except OSError as exc:
        print(f"cannot write {out / _bench.RESULTS_FILE}: {exc.strerror}")
        return 1
    _report_plots(document["rows"], _bench.machine_line(machine), out)
    print(f"total time: {time.perf_counter() - start:.1f} s")
    if any(o.status == "failed" for o in outcomes):
        return 1
    if not any(o.status == "ok" for o in outcomes):
        print("no suite ran")
        return 1
    return 0


def _report_plots(rows: list[dict], footnote: str, out: Path) -> None:
    """Write the plots and print where they went (or why one is missing)."""
    try:
        from . import plots as _plots

        written, notes = _plots.write_plots(rows, footnote, out)
    except ImportError as exc:
        print(f"no plots: {exc.name or 'matplotlib'} is not installed (pip install 'dplr[bench]')")
        return
    for path in written:
        print(f"plot: {path}")
    for note in notes:
        print(note)


def cmd_demo(window: int, steps: int | None, out: Path) -> int:
    """Run ``python -m dplr demo``; return the exit code (1 if the two paths disagree)."""
    try:
        from . import demo
    except ImportError as exc:
        print(f"the demo needs {exc.name}, which is not installed (pip install 'dplr[demo]')")
        return 1
    return demo.main(window=window, steps=steps, out=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dplr`` and the ``dplr`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit code.  Bad arguments print a usage message and raise
        ``SystemExit(2)`` (argparse's convention).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        return cmd_bench(args.suite, mode, args.out)
    return cmd_demo(args.window, args.steps, args.out)
