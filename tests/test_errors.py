"""dplr._errors: the exception types, as raised by the public functions.

Each case is built so that the failure is certain from the definition: an
exact zero on the diagonal of T (no inverse), a downdate by a vector with
``||L^-1 u|| = 2 > 1`` (the result would be indefinite).
"""

from __future__ import annotations

import numpy as np
import pytest

import dplr
from dplr._errors import NotPositiveDefiniteError, SingularMatrixError


def test_both_are_linalg_errors_exported_by_the_package():
    for cls in (SingularMatrixError, NotPositiveDefiniteError):
        assert issubclass(cls, np.linalg.LinAlgError)
    assert dplr.SingularMatrixError is SingularMatrixError
    assert dplr.NotPositiveDefiniteError is NotPositiveDefiniteError


def test_batch_indices_are_kept_and_default_to_none_listed():
    err = NotPositiveDefiniteError("message", ((0, 1), (2, 0)))
    assert err.batch_indices == ((0, 1), (2, 0)) and str(err) == "message"
    assert NotPositiveDefiniteError("m").batch_indices == ()


def test_from_mask_lists_the_failed_entries_in_the_message():
    ok = np.ones((3, 5), dtype=bool)
    ok[0, 4] = ok[2, 1] = False
    err = NotPositiveDefiniteError.from_mask(ok, "the thing", "nothing was written")
    assert err.batch_indices == ((0, 4), (2, 1))
    head = "the thing is not positive definite at batch entries (0, 4), (2, 1);"
    assert str(err).startswith(head)
    assert "nothing was written (pass errors='flag'" in str(err)
    many = NotPositiveDefiniteError.from_mask(np.zeros(12, dtype=bool), "x", "y")
    assert len(many.batch_indices) == 12 and "(9,), ..." in str(many)
    single = NotPositiveDefiniteError.from_mask(np.array(False), "x", "y")
    assert single.batch_indices == ((),) and "batch entries" not in str(single)


def test_singular_diagonal_raises_singular_matrix_error():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 6, 3))
    diag = np.ones(6)
    diag[4] = 0.0
    with pytest.raises(SingularMatrixError, match="diag"):
        dplr.tril_solve(q, k, np.ones((6, 1)), diag=diag)


def test_indefinite_downdate_lists_the_failed_batch_entries():
    eye = np.broadcast_to(np.eye(3), (2, 3, 3)).copy()
    u = np.zeros((2, 3, 1))
    u[1, 0, 0] = 2.0  # ||L^-1 u|| = 2 >= 1 for the identity factor of entry 1 only
    with pytest.raises(NotPositiveDefiniteError) as info:
        dplr.cholesky_downdate(eye, u)
    assert info.value.batch_indices == ((1,),)
