"""dplr.core._decay's adjoint blocks against the definition, pair by pair."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import eps, rel_err
from dplr._runtime.backend import NumpyOps
from dplr.core._decay import channel_pull_blocks_pair, chunk_decay
from dplr.core._kernels import chunk_rows


def pull_by_definition(a, q, k, g):
    """``dq_ic = sum_{j<i} a_ij k_jc exp(sum g over (j, i])`` and ``dk`` alike, one chunk."""
    c, d = q.shape
    dq, dk = np.zeros((c, d)), np.zeros((c, d))
    for i in range(c):
        for j in range(i):
            factor = np.exp(g[j + 1 : i + 1].sum(0))  # -inf inside: exactly 0
            dq[i] += a[i, j] * k[j] * factor
            dk[j] += a[i, j] * q[i] * factor
    return dq, dk


@pytest.mark.parametrize("steepest", [0.5, 5.0, 200.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_pull_blocks_pair_is_the_definition(steepest, dtype):
    rng = np.random.default_rng(int(steepest))
    n, c, d = 70, 32, 5
    q, k = rng.standard_normal((2, n, d))
    a_rows = rng.standard_normal((n, c))
    g = -rng.uniform(0.0, steepest, (n, d))
    g[rng.uniform(size=g.shape) < 0.03] = -np.inf  # resets inside sub-blocks
    dec = chunk_decay(NumpyOps, g.astype(dtype), c, chunk_rows)
    qc, kc = (chunk_rows(NumpyOps, x.astype(dtype), c) for x in (q, k))
    a = chunk_rows(NumpyOps, a_rows.astype(dtype), c)  # (nc, c, c): one square per chunk
    dq, dk = channel_pull_blocks_pair(NumpyOps, a, qc, kc, dec)
    for j in range(qc.shape[0]):
        rows = slice(j * c, min((j + 1) * c, n))
        m = rows.stop - rows.start
        want_q, want_k = pull_by_definition(a[j, :m, :m], q[rows], k[rows], g[rows])
        # c products per entry, each with exponent error ~ eps * (budget of a sub-block).
        tol = 10 * c * eps(dtype) * (1 + min(c * steepest, 80.0 if dtype == np.float32 else 600.0))
        assert rel_err(dq[j, :m], want_q) < tol
        assert rel_err(dk[j, :m], want_k) < tol
