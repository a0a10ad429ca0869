"""The command line (``python -m dplr bench | demo``): benchmark orchestration, plots, the demo.

The library never imports this package.
"""
