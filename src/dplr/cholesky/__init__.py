"""Cholesky factor of a low-rank modification: update, downdate, insert, delete."""

from .modify import cholesky_delete, cholesky_downdate, cholesky_insert, cholesky_update

__all__ = ["cholesky_delete", "cholesky_downdate", "cholesky_insert", "cholesky_update"]
