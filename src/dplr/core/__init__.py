"""The core structure ``T = diag(lam) + tril(Q K^T ⊙ D, -1)``: class, chunked kernels, gradients."""

from .tril import LowRankTril, tril_inv, tril_matmul, tril_solve

__all__ = ["LowRankTril", "tril_inv", "tril_matmul", "tril_solve"]
