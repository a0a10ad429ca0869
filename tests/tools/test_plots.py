"""dplr.tools.plots: the PNG files, their labels, and the crossover search."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from dplr.tools import plots as _plots


def chol_rows(sizes=(500, 2000)):
    rows = []
    for n in sizes:
        for m in (1, 8, 64, 512):
            p = {"plot": "chol_vs_M", "N": n, "M": m, "rank1_s": 2e-4 * m * n / 500,
                 "blocked_s": 1e-4 * m * n / 500, "refactor_s": 0.02 * (n / 500) ** 3}  # fmt: skip
            rows.append({"case": 'update, method="auto"', "params": p, "baseline_s": 1.0,
                         "dplr_s": 1.0})  # fmt: skip
    return rows


def delta_rows():
    return [
        {"case": "throughput", "baseline_s": t / 2e4, "dplr_s": t / 1e5,
         "params": {"plot": "delta_tokens", "T": t, "H": 8, "K": 64, "V": 64,
                    "chunked_tok_s": 1e5 * (1 - t / 1e5), "recurrent_tok_s": 2e4}}
        for t in (512, 1024, 2048, 4096)
    ]  # fmt: skip


def texts(fig_path, monkeypatch, draw, rows):
    """Draw, and return every text of the figure (title, legend, labels, tick labels)."""
    import matplotlib.pyplot as plt

    seen = {}
    original = _plots._save

    def keep(fig, path):
        fig.canvas.draw()
        seen["texts"] = [t.get_text() for t in fig.findobj(plt.Text)]
        return original(fig, path)

    monkeypatch.setattr(_plots, "_save", keep)
    path = draw(rows, "2 cores; numpy 2", fig_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return seen["texts"]


def test_chol_plot_legend_and_crossovers_name_n_not_rows(tmp_path, monkeypatch):
    found = texts(tmp_path / "c.png", monkeypatch, _plots.plot_chol_vs_M, chol_rows())
    legend = [t for t in found if t.startswith(("refactorisation", "blocked", "rank-1"))]
    assert "refactorisation, N = 500" in legend and "blocked, N = 2000" in legend
    assert not any("auto" in t or "grid" in t for t in found)
    marks = [t for t in found if "= refactorisation at M" in t]
    assert marks and all(t.startswith(" N = ") for t in marks)


def test_delta_plot_states_the_shape_and_labels_its_ticks(tmp_path, monkeypatch):
    found = texts(tmp_path / "d.png", monkeypatch, _plots.plot_delta_tokens, delta_rows())
    assert any("H = 8, K = 64, V = 64" in t for t in found)
    assert not any("throughput" in t for t in found)
    assert {"512", "1024", "2048", "4096"} <= set(found)  # every T on the x axis
    assert "20k" in found  # the recurrence's rate is a labelled tick and a point label
    assert sum(t.endswith("k") for t in found) >= 5


def test_write_plots_skips_missing_suites_with_a_note(tmp_path):
    written, notes = _plots.write_plots(delta_rows(), "footnote", tmp_path)
    assert [p.name for p in written] == ["delta_tokens.png"]
    assert any(n.startswith("no chol_vs_M.png: suite cholesky") for n in notes)


def test_crossovers_interpolate_in_log_space():
    m = np.array([1.0, 10.0, 100.0])
    assert _plots.crossovers(m, np.array([1.0, 10.0, 100.0]), np.full(3, 10.0)) == [
        pytest.approx(10.0)
    ]
    assert _plots.crossovers(m, np.full(3, 1.0), np.full(3, 2.0)) == []


def test_thousands_labels():
    labels = [_plots._thousands(x) for x in (500, 2e4, 1.5e5, 2.5e6)]
    assert labels == ["500", "20k", "150k", "2.5M"]
