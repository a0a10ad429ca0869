"""dplr's benchmark suites (installed as ``dplr_bench``; run with ``python -m dplr bench``).

One module per suite (``core``, ``cholesky``, ``delta``, ...), each exposing
``run(quick=False, progress=None) -> list[Row]``; shared timing, rows and
tables are in ``_common``.  The suites use dplr's public API only, and
nothing in this package imports the command line (``dplr.tools``), which
imports these modules.  A new suite is a new module here: it is found by
:func:`suite_names`, run by ``--suite all`` and by the smoke test.
"""

from __future__ import annotations

import pkgutil

#: Suites that run first, in this order; any other suite module follows, by name.
FIRST = ("core", "cholesky", "delta", "models", "distributed")


def suite_names() -> tuple[str, ...]:
    """The names of the suite modules in this package (those not starting with ``_``)."""
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return tuple(n for n in FIRST if n in found) + tuple(sorted(found - set(FIRST)))
