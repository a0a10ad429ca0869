"""PNG plots of benchmark results (matplotlib, Agg backend, imported lazily).

Every plot is drawn from the row dicts of ``results.json`` alone, selected by
``params["plot"]``:

- ``"solve_vs_n"`` (core): ``n``; ``dplr_s`` is the chunked solve and
  ``baseline_s`` the dense triangular solve.
- ``"chol_vs_M"`` (cholesky): ``N``, ``M``, ``rank1_s``, ``blocked_s``,
  ``refactor_s``.
- ``"delta_tokens"`` (delta): ``T``, ``chunked_tok_s``, ``recurrent_tok_s``
  (and ``H``, ``K``, ``V`` for the title, where present).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Rows = Sequence[dict[str, Any]]

PLOTS: dict[str, tuple[str, str]] = {
    "solve_vs_n": ("solve_vs_n.png", "core"),
    "chol_vs_M": ("chol_vs_M.png", "cholesky"),
    "delta_tokens": ("delta_tokens.png", "delta"),
}
"""Plot key -> (file name, suite that provides its rows)."""


def select(rows: Rows, plot: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows tagged ``params["plot"] == plot`` that hold every key as a number.

    A key is looked up in the row's ``params``, then in the row itself
    (``dplr_s``, ``baseline_s``); rows with a missing or non-finite value
    (``None`` in JSON) are left out.
    """
    out = []
    for row in rows:
        params = row.get("params") or {}
        if params.get("plot") != plot:
            continue
        values = [params.get(k, row.get(k)) for k in keys]
        if all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            out.append(row)
    return out


def group_by(rows: Rows, key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    """Rows grouped by ``key(row)``, in first-seen order."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return dict(groups)


def crossovers(x: np.ndarray, fast: np.ndarray, slow: np.ndarray) -> list[float]:
    """Where ``fast`` stops being below ``slow``, interpolated on log-log axes.

    Parameters
    ----------
    x : (m,) ndarray
        Increasing positive abscissae.
    fast, slow : (m,) ndarray
        Positive times at ``x``.

    Returns
    -------
    list of float
        The x at each sign change of ``log(fast / slow)`` from negative to
        non-negative (geometric interpolation between the two points).

    Examples
    --------
    >>> crossovers(np.array([1.0, 4.0]), np.array([1.0, 4.0]), np.array([2.0, 2.0]))
    [2.0]
    """
    d = np.log(fast) - np.log(slow)
    out = []
    for i in range(len(x) - 1):
        if d[i] < 0 <= d[i + 1]:
            w = d[i] / (d[i] - d[i + 1])
            out.append(float(np.exp((1 - w) * np.log(x[i]) + w * np.log(x[i + 1]))))
    return out


def _figure(title: str, footnote: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), layout="constrained")
    ax.set_title(title)
    fig.text(0.01, 0.005, footnote, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.get_layout_engine().set(h_pad=0.25)
    return fig, ax


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> Path:
    """Axis labels, grid and legend of a benchmark plot; save it and return the path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sorted(rows: Rows, key: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    rows = sorted(rows, key=lambda r: r["params"][key])
    return np.array([r["params"][key] for r in rows], dtype=float), rows


def plot_solve_vs_n(rows: Rows, footnote: str, path: Path) -> Path:
    """Solve time against n, chunked (dplr) and dense baseline, log-log, O(n), O(n²) slopes."""
    fig, ax = _figure("Triangular solve: time against n", footnote)
    for i, (case, group) in enumerate(group_by(rows, lambda r: r["case"]).items()):
        n, group = _sorted(group, "n")
        color = f"C{2 * i}"
        dplr_s = np.array([r["dplr_s"] for r in group])
        base_s = np.array([r["baseline_s"] for r in group])
        ax.loglog(n, dplr_s, "o-", color=color, label=f"dplr chunked ({case})")
        ax.loglog(n, base_s, "s--", color=f"C{2 * i + 1}", label=f"{group[0]['baseline']} ({case})")
    if rows:
        n_all = np.array(sorted({float(r["params"]["n"]) for r in rows}))
        first = [r for r in rows if r["params"]["n"] == n_all[0]]
        t0 = 0.5 * min(min(r["dplr_s"], r["baseline_s"]) for r in first)
        for power, style in ((1, ":"), (2, "-.")):
            ref = t0 * (n_all / n_all[0]) ** power
            ax.loglog(n_all, ref, style, color="0.5", label=f"O(n{'²' if power == 2 else ''})")
    return _finish(fig, ax, "n (rows of T)", "time per solve (s)", path)


def plot_chol_vs_M(rows: Rows, footnote: str, path: Path) -> Path:
    """Cholesky modification time against M at fixed N: rank-1, blocked, refactorisation.

    One set of three lines per N; each crossing of an update method above
    refactorisation is marked with a dotted vertical line labelled with its N.
    """
    sizes = sorted({int(r["params"]["N"]) for r in rows})
    fig, ax = _figure(
        f"Cholesky modification of M columns, N = {', '.join(map(str, sizes))}", footnote
    )
    styles = (("rank1_s", "o-", "rank-1 sweeps"), ("blocked_s", "s-", "blocked"))
    groups = group_by(rows, lambda r: int(r["params"]["N"]))
    for j, (size, group) in enumerate(sorted(groups.items())):
        m, group = _sorted(group, "M")
        suffix = f", N = {size}" if len(groups) > 1 else ""
        refactor = np.array([r["params"]["refactor_s"] for r in group])
        ax.loglog(m, refactor, "^--", color=f"C{3 * j + 2}", label=f"refactorisation{suffix}")
        for i, (key, style, label) in enumerate(styles):
            t = np.array([r["params"][key] for r in group])
            color = f"C{3 * j + i}"
            ax.loglog(m, t, style, color=color, label=f"{label}{suffix}")
            for x in crossovers(m, t, refactor):
                ax.axvline(x, color=color, ls=":", lw=1.2)
                ax.text(
                    x,
                    0.03,
                    f" N = {size}: {label} = refactorisation at M ≈ {x:.3g}",
                    transform=ax.get_xaxis_transform(),
                    rotation=90,
                    fontsize=8,
                    color=color,
                    ha="right",
                    va="bottom",
                )
    return _finish(
        fig, ax, "M (columns inserted, deleted or updated)", "time per modification (s)", path
    )


def _thousands(value: float, _pos: Any = None) -> str:
    """Tick label of a token rate: 20k, 150k, 1.2M."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    return f"{value / 1e3:.3g}k" if value >= 1e3 else f"{value:.3g}"


def plot_delta_tokens(rows: Rows, footnote: str, path: Path) -> Path:
    """Delta-rule throughput (tokens/s) against T: dplr's chunked form and the recurrence.

    Each point is labelled with its rate, and the y axis has ticks at 1, 2
    and 5 times each power of ten, so that every line has a labelled tick
    near it; the title states the batch, heads and head sizes of the rows.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator

    first = rows[0]["params"]
    shape = ", ".join(f"{k} = {first[k]}" for k in ("H", "K", "V") if k in first)
    title = "Delta rule forward: tokens per second against T"
    fig, ax = _figure(f"{title}\n(B = 1{', ' + shape if shape else ''}, float32)", footnote)
    t, group = _sorted(rows, "T")
    lines = (
        ("chunked_tok_s", "o-", "dplr"),
        ("recurrent_tok_s", "s--", "token-by-token recurrence"),
    )
    for i, (key, style, label) in enumerate(lines):
        tok = np.array([r["params"][key] for r in group])
        ax.loglog(t, tok, style, color=f"C{i}", label=label)
        for x, y in zip(t, tok, strict=True):
            ax.annotate(_thousands(y), (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=f"C{i}")  # fmt: skip
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xticks(t, [f"{int(x)}" for x in t])
    ax.minorticks_off()
    return _finish(fig, ax, "T (tokens per sequence)", "tokens per second", path)


_DRAW: dict[str, tuple[Callable[[Rows, str, Path], Path], tuple[str, ...]]] = {
    "solve_vs_n": (plot_solve_vs_n, ("n", "dplr_s", "baseline_s")),
    "chol_vs_M": (plot_chol_vs_M, ("N", "M", "rank1_s", "blocked_s", "refactor_s")),
    "delta_tokens": (plot_delta_tokens, ("T", "chunked_tok_s", "recurrent_tok_s")),
}


def write_plots(rows: Rows, footnote: str, out: Path) -> tuple[list[Path], list[str]]:
    """Draw every plot that has rows; say in one line why each other one is missing.

    Parameters
    ----------
    rows : sequence of dict
        Row dicts as in ``results.json``.
    footnote : str
        Machine and versions, printed small under each plot.
    out : Path
        Existing folder for the PNG files.

    Returns
    -------
    written : list of Path
        The PNG files written.
    notes : list of str
        One line per plot not written.
    """
    written, notes = [], []
    for plot, (draw, keys) in _DRAW.items():
        name, suite = PLOTS[plot]
        chosen = select(rows, plot, keys)
        if not chosen:
            notes.append(f"no {name}: suite {suite} did not run or gave no {plot!r} rows")
            continue
        written.append(draw(chosen, footnote, out / name))
    return written, notes


def plot_demo(
    t: np.ndarray,
    y: np.ndarray,
    t_pred: np.ndarray,
    mean: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    path: Path,
    zoom: int = 104,
) -> Path:
    """Data, one-step-ahead predictions and their 95% band; the last ``zoom`` steps below.

    Parameters
    ----------
    t, y : (n,) ndarray
        The whole series (years, ppm).
    t_pred, mean, lo, hi : (S,) ndarray
        Times predicted, predictive mean and band limits (ppm).
    path : Path
        PNG file to write.
    zoom : int
        Number of final predictions shown in the lower panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 7), layout="constrained")
    tail = slice(max(0, t_pred.size - zoom), None)
    for ax, sel in ((axes[0], slice(None)), (axes[1], tail)):
        lo_t = t_pred[sel][0]
        shown = t >= (t[0] if ax is axes[0] else lo_t)
        ax.plot(t[shown], y[shown], ".", ms=2, color="0.3", label="observed (weekly)")
        ax.fill_between(t_pred[sel], lo[sel], hi[sel], color="C0", alpha=0.25, label="95% band")
        ax.plot(t_pred[sel], mean[sel], "-", lw=0.8, color="C0", label="one-step-ahead mean")
        ax.set_xlabel("year")
        ax.set_ylabel("CO2 (ppm)")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("Mauna Loa CO2: sliding-window GP, Cholesky insert/delete")
    axes[1].set_title(f"last {min(zoom, t_pred.size)} predictions")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
