"""dplr: fast, exact linear algebra with diagonal-plus-low-rank triangular structure.

The public API, re-exported from the modules that implement it:

- :class:`LowRankTril` and :func:`tril_matmul`, :func:`tril_solve`,
  :func:`tril_inv`: ``T = diag(lam) + tril(Q K^T ⊙ D, -1)`` (module ``dplr.tril``).
"""

from ._errors import NotPositiveDefiniteError, SingularMatrixError
from .tril import LowRankTril, tril_inv, tril_matmul, tril_solve

__version__ = "0.1.0"

__all__ = [
    "LowRankTril",
    "NotPositiveDefiniteError",
    "SingularMatrixError",
    "__version__",
    "tril_inv",
    "tril_matmul",
    "tril_solve",
]
