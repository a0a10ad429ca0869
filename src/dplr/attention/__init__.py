"""Linear attention built on the core: the delta rule, the gated delta rule and KDA."""

from .delta import delta_rule, gated_delta_rule
from .kda import kda

__all__ = ["delta_rule", "gated_delta_rule", "kda"]
