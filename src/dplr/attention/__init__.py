"""Linear attention built on the core: the delta rule and the gated delta rule."""

from .delta import delta_rule, gated_delta_rule

__all__ = ["delta_rule", "gated_delta_rule"]
