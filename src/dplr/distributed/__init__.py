"""dplr beyond one process.

- :func:`delta_rule`, :func:`gated_delta_rule`, :func:`kda`: context parallelism, a
  sequence split across the ranks of a ``torch.distributed`` process group
  (module ``dplr.distributed.context``).
- ``dplr.distributed.dask``: the batched Cholesky modifications over a Dask
  array of factors (import it explicitly; it needs the ``distributed`` extra).
"""

from .context import delta_rule, gated_delta_rule, kda

__all__ = ["delta_rule", "gated_delta_rule", "kda"]
