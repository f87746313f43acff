"""Memory estimator: per-GPU peak and host memory of a training run, before it runs (docs/memory.md)."""

from .estimate import MemoryEstimate, Tuning, estimate
from .zero import PROFILE_NAMES, ZeroSettings

__all__ = ["MemoryEstimate", "PROFILE_NAMES", "Tuning", "ZeroSettings", "estimate"]
