"""``python -m dplr``: see :mod:`dplr.cli`."""

from .cli import main

raise SystemExit(main())
