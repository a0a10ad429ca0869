"""The decorator of the compiled loops."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from dplr._runtime import jit as jit_module


def test_compiles_with_the_options_given():
    @jit_module.jit(nogil=True)
    def total(a):
        s = 0.0
        for x in a:
            s += x
        return s

    assert total(np.arange(5.0)) == 10.0
    assert total.targetoptions["nogil"] is True


def test_compiles_in_memory_when_no_cache_directory_is_writable(monkeypatch):
    real = numba.njit

    def njit(cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(cache=cache, **options)

    monkeypatch.setattr(jit_module.nb, "njit", njit)
    with pytest.warns(RuntimeWarning, match="numba cache disabled"):

        @jit_module.jit()
        def twice(x):
            return 2 * x

    assert twice(21) == 42
