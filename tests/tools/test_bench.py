"""dplr.tools.bench and the suites of dplr_bench: every real suite at tiny sizes,
the tables, the timing helper, and the boundaries between library, suites and tools."""

from __future__ import annotations

import ast
import io
import math
import subprocess
import sys
import time
from pathlib import Path

import dplr_bench
import pytest
from dplr_bench import _common
from dplr_bench._common import Row

import dplr
from dplr.tools import bench as _bench

BENCHMARKS = Path(dplr_bench.__file__).parent


# -------------------------------------------------------------- the real suites
def test_the_suites_are_found():
    names = dplr_bench.suite_names()
    assert names[:3] == ("core", "cholesky", "delta")
    assert {"models", "distributed"} <= set(names)  # the suites on main when this was written
    assert all(not n.startswith("_") for n in names)


@pytest.mark.parametrize("name", dplr_bench.suite_names())
def test_every_suite_runs_at_tiny_sizes(name):
    """The smoke mode of each registered suite: rows that say what the tables claim."""
    messages = []

    class Recorder:
        last = ""

        def __call__(self, message):
            messages.append(message)
            self.last = message

        def close(self):
            pass

    outcome = _bench.run_suite(name, "smoke", lambda suite: Recorder())
    if outcome.status == "skipped":  # only for an optional dependency that is missing
        assert "which is not installed" in outcome.note or "not installed" in messages[-1]
        pytest.skip(outcome.note or messages[-1])
    assert outcome.status == "ok", outcome.note
    assert messages and _common.MODE == "full"  # the mode is reset after the run
    for row in outcome.rows:
        label = f"{row['case']} / {row['baseline']}"
        assert row["suite"] == name and row["case"] and row["size"] and row["baseline"], label
        assert row["baseline_s"] > 0 and row["dplr_s"] > 0, label
        assert math.isclose(row["ratio"], row["baseline_s"] / row["dplr_s"]), label
        for word in ("seed", "issue", "target"):
            assert word not in f"{row['case']} {row['baseline']} {row['note']}".lower(), label
        if row["error"] is not None:
            # Every result compared is float32 or better and well conditioned:
            # 1e-3 is far above rounding (~1e-6) and far below a wrong answer (~1).
            assert 0 <= row["error"] < 1e-3, label


# ---------------------------------------------------------------- boundaries
def test_import_dplr_loads_no_tools():
    code = (
        "import sys, dplr; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'tqdm', 'dplr_bench') or m.startswith('dplr.tools')]; "
        "print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def _private_uses(source: str) -> list[str]:
    """Imports and attribute chains that reach a private part of dplr (a name with ``_``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dplr"):
            parts = node.module.split(".") + [alias.name for alias in node.names]
            if node.module.split(".")[0] == "dplr" and any(p.startswith("_") for p in parts):
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dplr" and any(p.startswith("_") for p in parts):
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "dplr":
                found.append(ast.unparse(node))
    return found


def test_the_scan_finds_private_names():
    bad = "import dplr._runtime\nfrom dplr.core._kernels import X\nx = dplr.cholesky._policy.f"
    assert len(_private_uses(bad)) == 3
    good = "import dplr\nfrom dplr.reference import tril_dense\ndplr.tril_solve"
    assert _private_uses(good) == []


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_suites_use_only_the_public_api(path):
    tree = ast.parse(path.read_text())
    assert _private_uses(path.read_text()) == []
    for node in ast.walk(tree):  # and never the command line: it imports them
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("dplr.tools"), path.name
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("dplr.tools") for a in node.names), path.name


def test_the_library_imports_no_tools():
    src = Path(dplr.__file__).parent
    for path in src.rglob("*.py"):
        if "tools" in path.relative_to(src).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.lstrip(".").split(".")
                assert "tools" not in parts and "dplr_bench" not in parts, path
                assert "reference" not in parts, f"{path}: the fast paths never use the references"


# -------------------------------------------------------------------- tables
def rows() -> list[Row]:
    return [
        Row("core", "solve", "n=256", "scipy solve_triangular", 2e-3, 1e-3, 1e-15),
        Row("core", "solve GFLOP/s", "n=1024", "one matmul", 1e-3, 2e-3, None, 0.3, "float32"),
    ]


def test_text_table_aligns_columns_and_shows_notes():
    lines = _common.format_table(rows(), markdown=False).splitlines()
    assert lines[0].split() == [
        "case", "size", "baseline", "baseline", "ms", "dplr", "ms", "ratio", "error",
    ]  # fmt: skip
    assert lines[2].endswith("2.00x  1.0e-15")
    assert lines[3].endswith("0.50x")  # no error computed: the cell is empty
    assert len(lines[2]) == len(lines[3]) + len("  1.0e-15")
    assert lines[4] == "    note: float32"


def test_markdown_table_has_a_note_column_and_empty_error_cells():
    lines = _common.format_table(rows()).splitlines()
    assert lines[0] == "| case | size | baseline | baseline ms | dplr ms | ratio | error | note |"
    assert lines[3].endswith("| 0.50x |  | float32 |")
    assert _common.format_table([r.as_dict() for r in rows()]) == "\n".join(lines)


def test_row_dict_calls_the_expectation_goal():
    d = rows()[1].as_dict()
    assert d["goal"] == 0.3 and "target" not in d and d["ratio"] == 0.5


def test_markdown_report_names_the_machine_mode_and_legend():
    outcome = _bench.SuiteOutcome("core", "ok", rows=[r.as_dict() for r in rows()])
    skipped = _bench.SuiteOutcome("delta", "skipped", "needs torch, which is not installed")
    machine = _bench.machine_info()
    text = _bench.markdown_report(_bench.results_document([outcome, skipped], machine, "quick"))
    assert text.startswith(f"Measured on {_bench.machine_line(machine)} (`--quick`).")
    assert "**core**\n\n| case |" in text
    assert "**delta**: skipped. needs torch" in text
    assert _common.LEGEND in text


# ------------------------------------------------------------------- timing
def test_median_times_measures_each_function():
    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    _common.configure("quick")
    try:
        fast, slow = _common.median_times([sleeper(0.001), sleeper(0.004)], repeats=3)
    finally:
        _common.configure("full")
    assert 0.001 <= fast < 0.004 <= slow  # sleep never returns early


def test_once_above_times_a_slow_function_once():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def fast():
        calls["fast"] += 1

    t_slow, t_fast = _common.median_times([slow, fast], repeats=5, once_above=0.01, settle=0.0)
    assert calls["slow"] == 2 and t_slow >= 0.02  # the first (untimed) call and one timed
    assert calls["fast"] > 5 and t_fast < 0.01


def test_modes_pick_sizes_and_reject_unknown_ones():
    try:
        _common.configure("smoke")
        assert _common.by_mode(1, 2, 3) == 3 and _common.by_mode(1, 2) == 2
        _common.configure(True)
        assert _common.MODE == "quick" and _common.by_mode(1, 2, 3) == 2
        _common.configure(False)
        assert _common.by_mode(1, 2, 3) == 1
        with pytest.raises(ValueError, match="mode must be"):
            _common.configure("huge")
    finally:
        _common.configure("full")


def test_rel_error_is_relative_to_the_largest_entry():
    assert _common.rel_error([1.0, 2.5], [1.0, 2.0]) == pytest.approx(0.25)


# ---------------------------------------------------------------- orchestration
def test_progress_plain_lines_and_bar():
    stream = io.StringIO()
    plain = _bench.ProgressDisplay("core", stream=stream)
    plain("n=256")
    plain.close()
    assert stream.getvalue() == "[core] n=256\n"
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = _bench.ProgressDisplay("core", stream=stream, bar=True)
    bar("n=256")
    bar("n=1024")
    bar.close()
    assert bar.count == 2
    assert "n=1024" in stream.getvalue()


def test_import_errors_are_classified():
    exc = ModuleNotFoundError("No module named 'torch._C'", name="torch._C")
    assert _bench.classify_import_error(exc, "delta") == (
        "skipped",
        "needs torch, which is not installed",
    )
    status, note = _bench.classify_import_error(
        ModuleNotFoundError("x", name="dplr_bench.core"), "core"
    )
    assert status == "skipped" and "no module dplr_bench.core" in note
    bug = ImportError("cannot import name 'nope' from 'dplr'", name="dplr")
    assert _bench.classify_import_error(bug, "core")[0] == "failed"
