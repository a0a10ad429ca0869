"""Sliding-window Gaussian-process regression on the Mauna Loa CO2 series.

A window of the last W observations of the weekly Mauna Loa CO2 record
(bundled with statsmodels) moves through the series.  At each step the model
predicts the next observation; then the window drops its oldest observation
and takes in the new one.  The Cholesky factor of the window's kernel matrix
``K + noise * I`` is maintained in two ways, which must give the same
predictions:

``"update"``
    :func:`dplr.cholesky_delete` removes the first row and column and
    :func:`dplr.cholesky_insert` appends the new one: O(W²) per step.
``"refactor"``
    :func:`scipy.linalg.cholesky` of the whole (slid) matrix: O(W³) per step.

Run it with ``python -m dplr demo``; the functions here are pure and small so
that the tests can run them on a short slice of the series.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg

from .._runtime.blas import single_threaded_blas

Method = Literal["update", "refactor"]

__all__ = [
    "KernelParams",
    "SlidingResult",
    "co2_series",
    "kernel",
    "main",
    "predict",
    "slide_refactor",
    "slide_update",
    "sliding_window",
]


@dataclass(frozen=True)
class KernelParams:
    """Fixed hyperparameters for standardised CO2 against time in years.

    ``k(s, t) = trend² RBF(r; trend_ls) + season² Per(r; 1 yr, per_ls) RBF(r; season_ls)
    + wiggle² RQ(r; wiggle_ls, rq_alpha)``, ``r = |s - t|``, plus
    ``noise²`` on the diagonal for the observations (and ``jitter``, zero
    unless a factorisation needs it).  The values are set by hand, in the
    spirit of Rasmussen & Williams (2006), section 5.4.3, and are not fitted.
    """

    trend: float = 2.0
    trend_ls: float = 20.0
    season: float = 0.15
    season_ls: float = 20.0
    per_ls: float = 1.0
    wiggle: float = 0.05
    wiggle_ls: float = 1.0
    rq_alpha: float = 1.0
    noise: float = 0.02
    jitter: float = 0.0


def co2_series() -> tuple[np.ndarray, np.ndarray]:
    """The weekly Mauna Loa CO2 record, missing weeks dropped.

    Returns
    -------
    t : (n,) ndarray
        Time in years (fractional, e.g. 1958.24).
    y : (n,) ndarray
        CO2 concentration in ppm.

    Notes
    -----
    ``statsmodels.datasets.co2`` (bundled data, no download); 2284 weeks from
    1958-03-29 to 2001-12-29, of which 59 are missing.
    """
    from statsmodels.datasets import co2

    data = co2.load_pandas().data["co2"].dropna()
    days = (data.index - data.index[0]).days.to_numpy(dtype=float)
    start = data.index[0]
    t0 = start.year + (start.day_of_year - 1) / 365.25
    return t0 + days / 365.25, data.to_numpy(dtype=float)


def kernel(s: np.ndarray, t: np.ndarray, p: KernelParams) -> np.ndarray:
    """The covariance ``k(s_i, t_j)`` of the latent function (no noise).

    Parameters
    ----------
    s : (m,) ndarray
        Times in years.
    t : (n,) ndarray
        Times in years.
    p : KernelParams
        Hyperparameters.

    Returns
    -------
    (m, n) ndarray
    """
    r = np.abs(s[:, None] - t[None, :])
    trend = p.trend**2 * np.exp(-0.5 * (r / p.trend_ls) ** 2)
    periodic = np.exp(-2.0 * (np.sin(np.pi * r) / p.per_ls) ** 2)
    season = p.season**2 * periodic * np.exp(-0.5 * (r / p.season_ls) ** 2)
    wiggle = p.wiggle**2 * (1.0 + (r / p.wiggle_ls) ** 2 / (2.0 * p.rq_alpha)) ** -p.rq_alpha
    return trend + season + wiggle


def gram(t: np.ndarray, p: KernelParams) -> np.ndarray:
    """``K(t, t) + (noise² + jitter) I``: the covariance of the observations at ``t``."""
    return kernel(t, t, p) + (p.noise**2 + p.jitter) * np.eye(t.size)


def new_column(t_window: np.ndarray, t_new: float, p: KernelParams) -> np.ndarray:
    """The last column of ``gram(append(t_window, t_new))``, shape ``(W + 1, 1)``."""
    t = np.append(t_window, t_new)
    col = kernel(t, t[-1:], p)
    col[-1, 0] += p.noise**2 + p.jitter
    return col


def slide_update(factor: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Slide the window by one with :func:`dplr.cholesky_delete` and :func:`dplr.cholesky_insert`.

    Parameters
    ----------
    factor : (W, W) ndarray
        Lower Cholesky factor of the window's matrix ``A``.
    col : (W, 1) ndarray
        Last column of the new matrix ``[[A[1:, 1:], c], [c^T, d]]``.

    Returns
    -------
    (W, W) ndarray
        Lower Cholesky factor of the new matrix, in O(W²) operations.
    """
    import dplr

    smaller = dplr.cholesky_delete(factor, 0, check_finite=False)
    return dplr.cholesky_insert(smaller, smaller.shape[0], col, check_finite=False)


def slide_refactor(a: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slide the window by one and factorise the new matrix from scratch.

    Parameters
    ----------
    a : (W, W) ndarray
        The window's matrix ``A``.
    col : (W, 1) ndarray
        Last column of the new matrix ``[[A[1:, 1:], c], [c^T, d]]``.

    Returns
    -------
    a_new, factor : (W, W) ndarray
        The new matrix (copied in O(W²)) and its lower Cholesky factor (O(W³)).
    """
    w = a.shape[0]
    a_new = np.empty_like(a)
    a_new[: w - 1, : w - 1] = a[1:, 1:]
    a_new[:, -1] = col[:, 0]
    a_new[-1, :] = col[:, 0]
    return a_new, refactor(a_new)


def refactor(a: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``a`` from scratch (LAPACK ``potrf``), O(W³)."""
    return scipy.linalg.cholesky(a, lower=True, check_finite=False)


def predict(
    factor: np.ndarray, y: np.ndarray, k_star: np.ndarray, k_star_star: float
) -> tuple[float, float]:
    """Posterior mean and variance of the latent function at one new time.

    Parameters
    ----------
    factor : (W, W) ndarray
        Lower Cholesky factor ``L`` of the window's ``K + noise² I``.
    y : (W,) ndarray
        The window's observations (standardised).
    k_star : (W,) ndarray
        Covariances between the window's times and the new time.
    k_star_star : float
        Prior variance at the new time.

    Returns
    -------
    mean, var : float
        ``k*ᵀ A⁻¹ y`` and ``k** - k*ᵀ A⁻¹ k*``, by two triangular solves with L.
    """
    both = np.column_stack([y, k_star])
    v = scipy.linalg.solve_triangular(factor, both, lower=True, check_finite=False)
    return float(v[:, 1] @ v[:, 0]), float(k_star_star - v[:, 1] @ v[:, 1])


@dataclass(frozen=True)
class SlidingResult:
    """Predictions of one pass through the series, and what they cost.

    Attributes
    ----------
    index : (S,) ndarray of int
        Position in the series of the observation predicted at each step.
    mean, var : (S,) ndarray
        Predictive mean and latent variance (standardised units).
    factor_s : float
        Seconds per step spent keeping the factor current.
    step_s : float
        Seconds per step in all (kernel column, factor, prediction).
    """

    index: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    factor_s: float
    step_s: float


def sliding_window(
    t: np.ndarray,
    y: np.ndarray,
    p: KernelParams,
    *,
    window: int,
    steps: int | None = None,
    method: Method = "update",
) -> SlidingResult:
    """One-step-ahead predictions with a window of ``window`` observations.

    Parameters
    ----------
    t, y : (n,) ndarray
        Times and standardised observations.
    p : KernelParams
        Kernel hyperparameters.
    window : int
        Observations in the window, ``1 <= window < n``.
    steps : int, optional
        Number of predictions; default (and at most) ``n - window``.
    method : {"update", "refactor"}
        How the factor follows the window (see the module docstring).

    Returns
    -------
    SlidingResult
        Step ``i`` predicts ``y[window + i]`` from ``y[i : window + i]``.

    Notes
    -----
    Each method takes one untimed warm-up step (numba compiles dplr's kernels
    on first use).  Both run with BLAS limited to one thread: the per-step
    operations are small, and threaded OpenBLAS is many times slower on them
    (and erratic on a busy machine); with one thread the comparison is fair.
    """
    if not 1 <= window < t.size:
        raise ValueError(f"window must be in [1, {t.size - 1}] for a series of {t.size}")
    if method not in ("update", "refactor"):
        raise ValueError(f"method must be 'update' or 'refactor'; got {method!r}")
    steps = t.size - window if steps is None else min(steps, t.size - window)
    with single_threaded_blas():
        return _slide(t, y, p, window, steps, method)


def _slide(
    t: np.ndarray, y: np.ndarray, p: KernelParams, window: int, steps: int, method: Method
) -> SlidingResult:
    """The loop of :func:`sliding_window` (arguments already checked)."""
    a = gram(t[:window], p)
    factor = refactor(a)
    prior_var = float(kernel(t[:1], t[:1], p)[0, 0])
    mean, var = np.empty(steps), np.empty(steps)
    if steps > 1:  # one untimed step first: JIT compilation, first-touch of buffers
        col = new_column(t[:window], t[window], p)[1:]
        if method == "update":
            slide_update(factor, col)
        else:
            slide_refactor(a, col)
    factor_s = 0.0
    start = time.perf_counter()
    for i in range(steps):
        j = window + i
        col = new_column(t[i:j], t[j], p)
        mean[i], var[i] = predict(factor, y[i:j], col[:-1, 0], prior_var)
        if i == steps - 1:
            break
        tick = time.perf_counter()
        if method == "update":
            factor = slide_update(factor, col[1:])
        else:
            a, factor = slide_refactor(a, col[1:])
        factor_s += time.perf_counter() - tick
    step_s = (time.perf_counter() - start) / steps
    return SlidingResult(
        np.arange(window, window + steps), mean, var, factor_s / max(steps - 1, 1), step_s
    )


def choose_jitter(a: np.ndarray, *, start: float = 1e-10, stop: float = 1e-4) -> float:
    """The smallest jitter ``start * 10^i * mean(diag(a))`` (or 0) that lets ``a`` factorise.

    Parameters
    ----------
    a : (W, W) ndarray
        Symmetric matrix meant to be positive definite.
    start, stop : float
        Range of jitter tried, relative to the mean of the diagonal.

    Returns
    -------
    float
        0.0 if a plain Cholesky factorisation succeeds, else the absolute jitter.

    Raises
    ------
    numpy.linalg.LinAlgError
        If even ``stop * mean(diag(a))`` is not enough.
    """
    scale = float(np.mean(np.diag(a)))
    jitter, rel = 0.0, start
    while True:
        try:
            refactor(a + jitter * np.eye(a.shape[0]))
            return jitter
        except np.linalg.LinAlgError:
            if rel > stop:
                raise
            jitter, rel = rel * scale, rel * 10


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square error of ``pred`` against ``truth``."""
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


def condition_number(a: np.ndarray) -> float:
    """2-norm condition number of a symmetric positive definite matrix."""
    ev = np.linalg.eigvalsh(a)
    return float(ev[-1] / ev[0])


def main(window: int = 500, steps: int | None = None, out: Path = Path("dplr-demo")) -> int:
    """Run the demo, print its report, write the plot; return the exit code.

    Parameters
    ----------
    window : int
        Observations in the window.
    steps : int, optional
        Limit on the number of one-step-ahead predictions.
    out : Path
        Folder for ``co2_sliding_gp.png``.

    Returns
    -------
    int
        0, or 1 if the two paths disagree by more than 1e-8 (or cannot run).
    """
    import dplr

    if not (hasattr(dplr, "cholesky_insert") and hasattr(dplr, "cholesky_delete")):
        print("this version of dplr has no cholesky_insert/cholesky_delete; the demo needs them")
        return 1
    t, ppm = co2_series()
    if not 1 <= window < t.size:
        print(f"--window must be below the series length {t.size}; got {window}")
        return 1
    mu, sd = float(ppm.mean()), float(ppm.std())
    y = (ppm - mu) / sd
    p = KernelParams()
    a0 = gram(t[:window], p)
    jitter = choose_jitter(a0)
    p = KernelParams(jitter=jitter)
    print(
        f"Mauna Loa CO2, weekly: {t.size} observations {t[0]:.2f}-{t[-1]:.2f} "
        f"(missing weeks dropped), standardised (mean {mu:.1f} ppm, sd {sd:.2f} ppm)"
    )
    print(
        f"kernel: trend RBF + decaying yearly periodic + rational quadratic, "
        f"noise sd {p.noise} ({p.noise * sd:.2f} ppm); cond(K + noise I) = "
        f"{condition_number(a0 + jitter * np.eye(window)):.1e} for the first window"
    )
    print(
        "jitter: none needed (the noise variance keeps the factor well defined)"
        if jitter == 0.0
        else f"jitter: {jitter:.1e} added to the diagonal (plain factor failed)"
    )
    try:
        upd = sliding_window(t, y, p, window=window, steps=steps, method="update")
        ref = sliding_window(t, y, p, window=window, steps=steps, method="refactor")
    except np.linalg.LinAlgError as exc:
        print(f"factorisation failed: {exc}")
        return 1
    n_steps = upd.index.size
    print(
        f"window W = {window} ({t[window] - t[0]:.1f} years), {n_steps} steps, "
        "BLAS on one thread for both paths"
    )
    truth = y[upd.index]
    print(f"{'':36}{'factor/step':>14}{'whole step':>14}{'RMSE':>12}")
    for name, res in (
        ("cholesky_delete + cholesky_insert", upd),
        ("refactorise (scipy cholesky)", ref),
    ):
        print(
            f"{name:36}{1e3 * res.factor_s:>11.3f} ms{1e3 * res.step_s:>11.3f} ms"
            f"{sd * rmse(res.mean, truth):>8.3f} ppm"
        )
    print(f"speed-up of the factor update: {ref.factor_s / upd.factor_s:.2f}x")
    band = 1.96 * np.sqrt(upd.var + p.noise**2 + p.jitter)
    print(
        f"one-step-ahead RMSE {sd * rmse(upd.mean, truth):.3f} ppm against "
        f"{sd * rmse(y[upd.index - 1], truth):.3f} ppm for repeating the last week; "
        f"the 95% band covers {100 * np.mean(np.abs(upd.mean - truth) <= band):.1f}%"
    )
    diff = float(np.max(np.abs(upd.mean - ref.mean)))
    ok = diff <= 1e-8
    print(
        f"max |prediction difference|, update vs refactorise: {diff:.1e} "
        f"(standardised units; {diff * sd:.1e} ppm) {'<=' if ok else '>'} 1e-8: "
        f"{'agree' if ok else 'DISAGREE'}"
    )
    _write_demo_plot(t, ppm, upd, mu, sd, band, out)
    return 0 if ok else 1


def _write_demo_plot(
    t: np.ndarray,
    ppm: np.ndarray,
    res: SlidingResult,
    mu: float,
    sd: float,
    band: np.ndarray,
    out: Path,
) -> None:
    """Write the plot of data, predictions and band, or say why not."""
    try:
        from . import plots as _plots
    except ImportError as exc:  # pragma: no cover - matplotlib is in the demo extra
        print(f"no plot: {exc.name} is not installed")
        return
    out.mkdir(parents=True, exist_ok=True)
    mean = mu + sd * res.mean
    path = _plots.plot_demo(
        t, ppm, t[res.index], mean, mean - sd * band, mean + sd * band, out / "co2_sliding_gp.png"
    )
    print(f"plot: {path}")
