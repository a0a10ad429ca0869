"""``python -m dplr bench`` and its arguments, end to end on stand-in suites.

The real suites are run by tests/tools/test_bench.py (at tiny sizes).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from dplr_bench._common import Row

from dplr.tools import bench as _bench
from dplr.tools.cli import main

PNGS = ("solve_vs_n.png", "chol_vs_M.png", "delta_tokens.png")


def core_rows() -> list[Row]:
    return [
        Row(
            "core",
            "solve d=16",
            f"n={n}",
            "scipy solve_triangular",
            1e-9 * n * n,
            2e-7 * n,
            1e-14,
            params={"plot": "solve_vs_n", "n": n},
        )
        for n in (256, 1024, 4096)
    ]


def cholesky_rows() -> list[Row]:
    rows = []
    for m in (1, 8, 64, 512):
        p = {"plot": "chol_vs_M", "N": 1000, "M": m}
        p |= {"rank1_s": 2e-4 * m, "blocked_s": 1e-4 * m, "refactor_s": 0.02}
        rows.append(
            Row("cholesky", "update", f"N=1000 M={m}", "refactor", 0.02, 1e-4 * m, 1e-13, params=p)
        )
    return rows


def delta_rows() -> list[Row]:
    return [
        Row(
            "delta",
            "forward",
            f"T={t}",
            "recurrent",
            t / 1e5,
            t / 1e6,
            1e-6,
            params={"plot": "delta_tokens", "T": t, "chunked_tok_s": 1e6, "recurrent_tok_s": 1e5},
        )
        for t in (128, 512, 2048)
    ]


FAKES = ("core", "cholesky", "delta")


def fake_suite(name: str, make_rows=None, error: Exception | None = None) -> types.ModuleType:
    """A stand-in suite module: calls progress once per row, returns the rows (or raises)."""
    module = types.ModuleType(f"dplr_bench.{name}")

    def run(quick: bool = False, progress=None):
        if error is not None:
            raise error
        rows = make_rows()
        for row in rows:
            if progress is not None:
                progress(f"{row.case} {row.size}")
        return rows

    module.run = run
    return module


@pytest.fixture(autouse=True)
def three_suites(monkeypatch):
    """The command line sees the three suites the fakes stand in for, whatever else exists."""
    monkeypatch.setattr(_bench, "suite_names", lambda: FAKES)


@pytest.fixture
def fake_suites(monkeypatch):
    """Install working fakes of all three suites in place of the real modules."""
    for name, rows in (("core", core_rows), ("cholesky", cholesky_rows), ("delta", delta_rows)):
        monkeypatch.setitem(sys.modules, f"dplr_bench.{name}", fake_suite(name, rows))


def load_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_bench_all_writes_tables_json_and_plots(fake_suites, tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    for heading in ("suite core (3 rows", "suite cholesky (4 rows", "suite delta (3 rows"):
        assert heading in captured.out
    assert "baseline ms" in captured.out and "ratio" in captured.out
    assert "target" not in captured.out and "seed" not in captured.out
    assert "error = largest difference between dplr's result and one computed without dplr" in (
        captured.out
    )
    assert f"the tables in Markdown: {tmp_path / 'results.md'}" in captured.out
    assert "[core] solve d=16 n=256" in captured.err  # plain progress lines: not a TTY
    doc = load_results(tmp_path)
    assert set(doc) == {"machine", "mode", "suites", "rows"}
    assert doc["mode"] == "quick"
    assert {"cores", "cpu", "date", "versions"} <= set(doc["machine"])
    assert {"numpy", "scipy", "torch", "dplr"} <= set(doc["machine"]["versions"])
    assert {s["status"] for s in doc["suites"].values()} == {"ok"}
    assert len(doc["rows"]) == 10
    for row in doc["rows"]:
        for key in ("baseline_s", "dplr_s", "error", "ratio"):
            assert math.isfinite(row[key])
        assert "goal" in row and "target" not in row
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Measured on ") and "(`--quick`)" in markdown
    assert markdown.count("| case | size | baseline |") == 3  # one Markdown table per suite
    for name in PNGS:
        path = tmp_path / name
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {path}" in captured.out


def test_bench_one_suite_notes_the_missing_plots(fake_suites, tmp_path, capsys):
    assert main(["bench", "--suite", "core", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "solve_vs_n.png").exists()
    assert not (tmp_path / "chol_vs_M.png").exists()
    assert "no chol_vs_M.png: suite cholesky did not run" in out
    assert "no delta_tokens.png: suite delta did not run" in out
    assert list(load_results(tmp_path)["suites"]) == ["core"]


def test_missing_suite_and_missing_torch_are_one_line_skips(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "dplr_bench.core", fake_suite("core", core_rows))
    monkeypatch.setitem(sys.modules, "dplr_bench.cholesky", None)  # module not there
    no_torch = ModuleNotFoundError("No module named 'torch'", name="torch")
    monkeypatch.setitem(sys.modules, "dplr_bench.delta", fake_suite("delta", error=no_torch))
    assert main(["bench", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "suite cholesky: skipped, not available in this version" in out
    assert "suite delta: skipped, needs torch, which is not installed" in out
    assert "Traceback" not in out
    suites = load_results(tmp_path)["suites"]
    assert [s["status"] for s in suites.values()] == ["ok", "skipped", "skipped"]


def test_suite_without_rows_is_skipped_with_its_last_message(monkeypatch, tmp_path, capsys):
    def run(quick=False, progress=None):
        progress("torch is not installed: skipping")
        return []

    module = types.ModuleType("dplr_bench.delta")
    module.run = run
    monkeypatch.setitem(sys.modules, "dplr_bench.delta", module)
    assert main(["bench", "--suite", "delta", "--out", str(tmp_path)]) == 1  # nothing ran
    out = capsys.readouterr().out
    assert "suite delta: skipped, it returned no rows: torch is not installed: skipping" in out


def test_failing_suite_is_reported_and_exit_code_is_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "dplr_bench.core", fake_suite("core", core_rows))
    boom = fake_suite("delta", error=RuntimeError("boom"))
    monkeypatch.setitem(sys.modules, "dplr_bench.delta", boom)
    monkeypatch.setitem(sys.modules, "dplr_bench.cholesky", fake_suite("cholesky", cholesky_rows))
    assert main(["bench", "--out", str(tmp_path)]) == 1
    assert "suite delta: FAILED, RuntimeError: boom" in capsys.readouterr().out
    assert load_results(tmp_path)["suites"]["delta"]["status"] == "failed"


def test_non_finite_numbers_become_null(monkeypatch, tmp_path):
    def rows():
        r = core_rows()
        r[0].error = float("nan")
        return r

    monkeypatch.setitem(sys.modules, "dplr_bench.core", fake_suite("core", rows))
    assert main(["bench", "--suite", "core", "--out", str(tmp_path)]) == 0
    assert load_results(tmp_path)["rows"][0]["error"] is None  # strict JSON, no NaN


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["bench", "--suite", "nope"],
        ["bench", "--bogus"],
        ["bench", "--quick", "--smoke"],
        ["demo", "--window", "0"],
        ["demo", "--steps", "many"],
    ],
)
def test_bad_arguments_print_usage_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: python -m dplr" in capsys.readouterr().err


def test_module_entry_point_bad_argument():
    proc = subprocess.run(
        [sys.executable, "-m", "dplr", "bench", "--suite", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "invalid choice" in proc.stderr


NO_TORCH_SCRIPT = """
import sys, types
sys.modules["torch"] = None  # as if torch were not installed
sys.path.insert(0, {tests!r})
from test_cli import FAKES, core_rows, fake_suite
from dplr.tools import bench
bench.suite_names = lambda: FAKES
sys.modules["dplr_bench.core"] = fake_suite("core", core_rows)

def needs_torch(quick=False, progress=None):
    import torch  # raises: None in sys.modules

delta = types.ModuleType("dplr_bench.delta")
delta.run = needs_torch
sys.modules["dplr_bench.delta"] = delta
sys.modules["dplr_bench.cholesky"] = None
from dplr.tools.cli import main
sys.exit(main(["bench", "--quick", "--out", {out!r}]))
"""


def test_runs_without_torch(tmp_path):
    script = NO_TORCH_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "torch is not installed" in proc.stdout
    assert "suite delta: skipped, needs torch, which is not installed" in proc.stdout
    doc = load_results(tmp_path)
    assert doc["machine"]["versions"]["torch"] is None
    assert (tmp_path / "solve_vs_n.png").exists()


def test_smoke_mode_reaches_the_suites(monkeypatch, tmp_path):
    seen = []

    def run(quick=False, progress=None):
        from dplr_bench import _common

        seen.append((quick, _common.MODE))
        return core_rows()

    module = types.ModuleType("dplr_bench.core")
    module.run = run
    monkeypatch.setitem(sys.modules, "dplr_bench.core", module)
    assert main(["bench", "--suite", "core", "--smoke", "--out", str(tmp_path)]) == 0
    assert seen == [(True, "smoke")]
    assert load_results(tmp_path)["mode"] == "smoke"
    assert "(`--smoke`)" in (tmp_path / "results.md").read_text()
