"""The cosine ramp that the lr schedule, the MIM teacher's EMA decay and the sparsity prune rate all follow."""
from __future__ import annotations

import math

__all__ = ['cosine_between']


def cosine_between(step: int, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped outside): the lr decay, the MIM
    teacher's EMA decay ramp and the sparsity prune rate."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))
