"""``python -m dplr``: see :mod:`dplr.tools.cli`."""

from .tools.cli import main

raise SystemExit(main())
