"""dplr: fast, exact linear algebra with diagonal-plus-low-rank triangular structure.

The public API, re-exported from the modules that implement it:

- :class:`LowRankTril` and :func:`tril_matmul`, :func:`tril_solve`,
  :func:`tril_inv`: ``T = diag(lam) + tril(Q K^T ⊙ D, -1)`` (package ``dplr.core``).
- :func:`cholesky_update`, :func:`cholesky_downdate`, :func:`cholesky_insert`,
  :func:`cholesky_delete`: Cholesky factor of a low-rank modification
  (package ``dplr.cholesky``).
- :func:`delta_rule`, :func:`gated_delta_rule` and :func:`kda`: the (gated)
  delta rule of linear attention and Kimi Delta Attention (one decay per key
  channel), exactly, in O(T) (package ``dplr.attention``).
- :func:`empty_cache`: free the memory kept between calls (scratch buffers and the
  memory of large arrays handed out, kept for reuse).
"""

from ._errors import NotPositiveDefiniteError, SingularMatrixError
from ._runtime.workspace import empty_cache
from .attention import delta_rule, gated_delta_rule, kda
from .cholesky import cholesky_delete, cholesky_downdate, cholesky_insert, cholesky_update
from .core import LowRankTril, tril_inv, tril_matmul, tril_solve

__version__ = "0.1.0"

__all__ = [
    "LowRankTril",
    "NotPositiveDefiniteError",
    "SingularMatrixError",
    "__version__",
    "cholesky_delete",
    "cholesky_downdate",
    "cholesky_insert",
    "cholesky_update",
    "delta_rule",
    "empty_cache",
    "gated_delta_rule",
    "kda",
    "tril_inv",
    "tril_matmul",
    "tril_solve",
]
