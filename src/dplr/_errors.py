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

    @classmethod
    def from_mask(cls, ok: np.ndarray, what: str, outcome: str) -> NotPositiveDefiniteError:
        """The error for the False entries of ``ok`` (a boolean array of the batch shape).

        The message reads "``what`` is not positive definite at batch entries
        ...; ``outcome`` (pass errors='flag' ...)", listing the first ten.
        """
        indices = tuple(tuple(int(i) for i in row) for row in np.argwhere(~np.asarray(ok)))
        shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
        where = "" if indices == ((),) else f" at batch entries {shown}"
        return cls(
            f"{what} is not positive definite{where}; {outcome} "
            "(pass errors='flag' to get a per-entry mask instead)",
            indices,
        )
