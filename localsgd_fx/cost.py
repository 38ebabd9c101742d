"""The GEMM cost model of a LoCal+SGD step: how much faster a step can be when a FLOP fraction is local."""
from __future__ import annotations

__all__ = ["speed_bound"]


def speed_bound(p: float, gemms: int = 1, sample_fraction: float = 1.0) -> float:
    """docs/DESIGN.md §5: the GEMM-model step speedup when a FLOP fraction ``p`` is local.

    An SGD layer costs 3 GEMMs (forward, error, weight gradient); a local one ``1 + gemms·f``.
    ``3/(3-p)`` for a 1-GEMM rule, ``3/(3-2p)`` for ``freeze``.
    """
    return 3.0 / (3.0 - (2.0 - gemms * sample_fraction) * p)
