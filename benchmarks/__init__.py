"""dplr's benchmark suites (installed as ``dplr_bench``; run with ``python -m dplr bench``).

One module per suite: ``core``, ``cholesky``, ``delta``.  Each exposes
``run(quick=False, progress=None) -> list[Row]``; the CLI and the modules'
own ``__main__`` share that code, so nothing is measured in two ways.
"""
