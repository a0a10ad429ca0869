"""The sliding-window GP demo: kernel, window slide, prediction, update vs refactorisation."""

from __future__ import annotations

import numpy as np
import pytest

from dplr.tools import demo

pytest.importorskip("statsmodels")


@pytest.fixture(scope="module")
def series():
    t, ppm = demo.co2_series()
    return t, (ppm - ppm.mean()) / ppm.std()


def test_series_is_weekly_without_gaps_in_values(series):
    t, y = series
    assert t.size == 2225 and np.all(np.isfinite(y))
    assert 1958 < t[0] < 1959 and 2001 < t[-1] < 2002
    assert np.all(np.diff(t) > 0)
    assert np.median(np.diff(t)) == pytest.approx(7 / 365.25)


def test_kernel_is_symmetric_positive_definite_and_yearly(series):
    t = series[0][:200]
    p = demo.KernelParams()
    k = demo.kernel(t, t, p)
    np.testing.assert_allclose(k, k.T, rtol=0, atol=1e-15)
    assert np.linalg.eigvalsh(demo.gram(t, p))[0] >= p.noise**2 * (1 - 1e-6)
    # the seasonal part makes points one year apart closer than half a year apart
    s = np.array([1990.0])
    assert demo.kernel(s, s + 1.0, p)[0, 0] > demo.kernel(s, s + 0.5, p)[0, 0]


def test_slide_refactor_gives_the_next_window(series):
    t, _ = series
    p = demo.KernelParams()
    w = 50
    col = demo.new_column(t[:w], t[w], p)
    a, factor = demo.slide_refactor(demo.gram(t[:w], p), col[1:])
    np.testing.assert_allclose(a, demo.gram(t[1 : w + 1], p), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(factor @ factor.T, a, rtol=1e-12, atol=1e-12)


def test_slide_update_matches_refactorisation(series):
    t, _ = series
    p = demo.KernelParams()
    w = 80
    a = demo.gram(t[:w], p)
    col = demo.new_column(t[:w], t[w], p)
    updated = demo.slide_update(demo.refactor(a), col[1:])
    _, fresh = demo.slide_refactor(a, col[1:])
    np.testing.assert_allclose(updated, fresh, rtol=0, atol=1e-10)


def test_predict_matches_dense_formula(series):
    t, y = series
    p = demo.KernelParams()
    a = demo.gram(t[:60], p)
    k_star = demo.kernel(t[:60], t[60:61], p)[:, 0]
    k_ss = demo.kernel(t[60:61], t[60:61], p)[0, 0]
    mean, var = demo.predict(demo.refactor(a), y[:60], k_star, k_ss)
    assert mean == pytest.approx(k_star @ np.linalg.solve(a, y[:60]), rel=1e-10)
    assert var == pytest.approx(k_ss - k_star @ np.linalg.solve(a, k_star), rel=1e-8)
    assert 0 < var < p.noise**2  # the next week is well determined by the window


def test_update_and_refactor_paths_agree_on_a_slice(series):
    t, y = series
    p = demo.KernelParams()
    kwargs = {"window": 100, "steps": 40}
    upd = demo.sliding_window(t, y, p, method="update", **kwargs)
    ref = demo.sliding_window(t, y, p, method="refactor", **kwargs)
    np.testing.assert_array_equal(upd.index, np.arange(100, 140))
    np.testing.assert_allclose(upd.mean, ref.mean, rtol=0, atol=1e-8)
    np.testing.assert_allclose(upd.var, ref.var, rtol=0, atol=1e-8)
    rmse = np.sqrt(np.mean((upd.mean - y[upd.index]) ** 2))
    assert rmse < 0.05  # standardised units: well under 1 ppm
    assert upd.factor_s > 0 and ref.step_s > 0


def test_sliding_window_rejects_bad_window(series):
    t, y = series
    with pytest.raises(ValueError, match="window"):
        demo.sliding_window(t[:10], y[:10], demo.KernelParams(), window=10)
    with pytest.raises(ValueError, match="method"):
        demo.sliding_window(t[:10], y[:10], demo.KernelParams(), window=5, method="dense")


def test_choose_jitter():
    a = np.ones((3, 3))  # rank one: a plain factor fails
    jitter = demo.choose_jitter(a)
    assert 0 < jitter <= 1e-4
    assert demo.choose_jitter(np.eye(3)) == 0.0


def test_demo_command_on_a_short_run(tmp_path, capsys):
    from dplr.tools.cli import main

    assert main(["demo", "--window", "120", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "one-step-ahead RMSE" in out and "agree" in out and "jitter: none" in out
    assert out.count(" ppm\n") >= 2  # an RMSE for each path
    assert (tmp_path / "co2_sliding_gp.png").stat().st_size > 1000
