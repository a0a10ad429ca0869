"""dplr.cholesky._policy: the choice of method and of BLAS threads, against docs/cholesky.md.

The expected choices are the measured table and the rule list of
``docs/cholesky.md`` section 5, written out here cell by cell; a threshold
moved in ``dplr._runtime.tuning`` without the table changes fails here.
"""

from __future__ import annotations

import pytest

from dplr.cholesky._policy import blas_thread_count, choose_method

#: (N, M) -> the fastest method of the measured table (single factor, NumPy);
#: the cells marked "≈" there (ties) are left out.
MEASURED = {
    (100, 1): "rank1", (100, 4): "rank1", (100, 16): "refactor", (100, 64): "refactor",
    (100, 256): "refactor",
    (500, 1): "rank1", (500, 4): "rank1", (500, 16): "blocked", (500, 64): "blocked",
    (500, 256): "blocked", (200, 256): "refactor", (300, 256): "blocked",
    (2000, 1): "rank1", (2000, 16): "blocked", (2000, 64): "blocked", (2000, 256): "blocked",
    (4000, 1): "rank1", (4000, 16): "blocked", (4000, 64): "blocked", (4000, 256): "blocked",
}  # fmt: skip


@pytest.mark.parametrize(("n", "m"), sorted(MEASURED))
def test_single_factor_follows_the_measured_table(n, m):
    assert choose_method(n, m, 1, torch=False) == MEASURED[(n, m)]


def _documented(n: int, m: int, batch: int) -> str:
    """The rule list of docs/cholesky.md, section 5 (NumPy)."""
    if m <= 2 or (batch > 1 and m <= 8) or (n <= 128 and m < 8) or (n <= 1000 and m <= 4):
        return "rank1"
    if n <= 128 or (m >= n and n <= 256):
        return "refactor"
    return "blocked"


@pytest.mark.parametrize("batch", [1, 7])
def test_numpy_rule_list_on_a_grid(batch):
    sizes = [
        1,
        2,
        3,
        4,
        5,
        7,
        8,
        9,
        16,
        64,
        100,
        128,
        129,
        250,
        256,
        257,
        500,
        501,
        1000,
        1001,
        4000,
    ]
    for n in sizes:
        for m in sizes:
            assert choose_method(n, m, batch, torch=False) == _documented(n, m, batch), (n, m)


def test_torch_never_gets_the_numpy_only_sweeps():
    # docs: "refactor when 2M >= N or N <= 64, else blocked".
    for n in [1, 10, 64, 65, 200, 3000]:
        for m in [1, 2, 8, 32, 100, 1500]:
            want = "refactor" if 2 * m >= n or n <= 64 else "blocked"
            assert choose_method(n, m, 3, torch=True) == want, (n, m)


def test_one_blas_thread_below_order_1000():
    # The docstring's measurement: below N = 1000 one thread is as fast.
    assert [blas_thread_count(n) for n in (10, 999, 1000, 4000)] == [1, 1, 0, 0]
