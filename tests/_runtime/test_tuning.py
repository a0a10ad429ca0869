"""Every tuning threshold in one place, documented, and the one the code uses."""

from __future__ import annotations

import ast
import inspect

import pytest

from dplr._runtime import tuning
from dplr.attention import _delta_grad
from dplr.cholesky import _blocked, _policy, _rank1
from dplr.core import _kernels

NAMES = [name for name in vars(tuning) if name.isupper()]


def test_every_threshold_is_a_positive_number_with_its_measurement_written_above_it():
    # Each name has a ``#:`` comment right above it, or above the name it is
    # grouped with (two consecutive assignments share one comment).
    lines = inspect.getsource(tuning).splitlines()
    documented = set()
    for node in ast.parse("\n".join(lines)).body:
        if not isinstance(node, ast.Assign):
            continue
        row = node.lineno - 2
        while row >= 0 and lines[row].split(" = ")[0].isupper():
            row -= 1  # the other names of a group
        comment = []
        while row >= 0 and lines[row].startswith("#:"):
            comment.append(lines[row])
            row -= 1
        if len(" ".join(comment)) > 40:
            documented.update(t.id for t in node.targets)
    assert set(NAMES) == documented
    for name in NAMES:
        value = getattr(tuning, name)
        assert isinstance(value, int | float) and value > 0, name


def test_the_modules_use_the_values_from_here():
    assert _kernels.DEFAULT_CHUNK == tuning.CHUNK_ROWS
    assert _kernels.effective_chunk(10_000, None) == tuning.CHUNK_ROWS
    assert _blocked.PANEL == tuning.CHOLESKY_CHUNK_ROWS
    assert _rank1.GROUP == tuning.RANK1_GROUP_ROWS
    assert _rank1.SMALL == tuning.RANK1_SMALL_ORDER
    assert _delta_grad.PASS_ROWS == tuning.DELTA_PASS_ROWS


@pytest.mark.parametrize(
    ("name", "n", "m", "batch", "before", "after"),
    [
        ("AUTO_RANK1_MAX_RANK", 3000, 2, 1, "rank1", "blocked"),
        ("AUTO_RANK1_BATCHED_MAX_RANK", 3000, 8, 4, "rank1", "blocked"),
        ("AUTO_SMALL_ORDER", 100, 16, 1, "refactor", "blocked"),
        ("AUTO_RANK1_MEDIUM_MAX_ORDER", 800, 4, 1, "rank1", "blocked"),
        ("AUTO_REFACTOR_WIDE_MAX_ORDER", 200, 256, 1, "refactor", "blocked"),
    ],
)
def test_the_auto_policy_reads_its_thresholds_here(monkeypatch, name, n, m, batch, before, after):
    assert _policy.choose_method(n, m, batch, False) == before
    monkeypatch.setattr(tuning, name, 1)
    assert _policy.choose_method(n, m, batch, False) == after


def test_threaded_blas_order(monkeypatch):
    assert _policy.blas_thread_count(tuning.THREADED_BLAS_MIN_ORDER) == 0
    assert _policy.blas_thread_count(tuning.THREADED_BLAS_MIN_ORDER - 1) == 1
    monkeypatch.setattr(tuning, "THREADED_BLAS_MIN_ORDER", 10)
    assert _policy.blas_thread_count(10) == 0
