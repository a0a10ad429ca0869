"""The decorator for dplr's compiled (Numba) loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numba as nb


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit`` with an on-disk cache when some cache directory is writable.

    Numba caches next to the source file, or in the user-wide cache directory
    (``NUMBA_CACHE_DIR`` overrides both) when the package is read-only; if no
    location is writable, compile in memory instead of failing at import.
    """

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return nb.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "no locator available": nowhere to cache
            warnings.warn(f"dplr: numba cache disabled ({exc})", RuntimeWarning, stacklevel=2)
            return nb.njit(cache=False, **options)(fn)

    return wrap
