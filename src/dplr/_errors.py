"""Exceptions raised for numerical failure (argument errors are ``ValueError``)."""

from __future__ import annotations

import numpy as np


class SingularMatrixError(np.linalg.LinAlgError):
    """A triangular matrix has an exact zero on its diagonal, so it has no inverse."""


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    """A Cholesky modification would leave a matrix that is not positive definite.

    Attributes
    ----------
    batch_indices : tuple of tuple of int
        Indices into the batch shape of the entries that failed (``((),)``
        for an unbatched call).
    """

    def __init__(self, message: str, batch_indices: tuple[tuple[int, ...], ...] = ()):
        super().__init__(message)
        self.batch_indices = batch_indices
