"""What a DeepSpeed profile (ds_configs/*.json) means for memory: ZeRO stage, offload, buckets.

`ZeroSettings.from_profile` reads a profile the way DeepSpeed and transformers do: missing keys take
DeepSpeed's defaults and "auto" sizes are filled from the model's hidden size, as transformers fills
them (constants.AUTO_*).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import constants as C

# The shipped profiles, cheapest first (least host memory and traffic; most GPU memory).
PROFILE_NAMES = ("zero2", "zero2_offload", "zero3", "zero3_offload")
PROFILE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class ZeroSettings:
    """The memory-relevant part of a DeepSpeed config.

    stage 0 with `deepspeed=False` means plain PyTorch (DDP / one process, torch AMP) without
    DeepSpeed: no partitioning, fp32 master weights only for fp16 AMP.
    """

    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: float | str = "auto"
    allgather_bucket_size: float | str = C.DS_DEFAULTS["allgather_bucket_size"]
    prefetch_bucket_size: float | str = "auto"
    param_persistence_threshold: float | str = "auto"
    max_live_parameters: float = C.DS_DEFAULTS["stage3_max_live_parameters"]
    sub_group_size: float = C.DS_DEFAULTS["sub_group_size"]
    deepspeed: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param and self.stage != 3:
            raise ValueError("offload_param needs ZeRO stage 3")

    @classmethod
    def from_profile(cls, profile: str | Path | dict[str, Any]) -> ZeroSettings:
        """Reads a DeepSpeed JSON (path, or a shipped profile's name such as "zero3_offload")."""
        name = "custom"
        if isinstance(profile, dict):
            config = profile
        else:
            path = Path(profile)
            if not path.exists() and str(profile) in PROFILE_NAMES:
                path = PROFILE_DIR / f"{profile}.json"
            config = json.loads(path.read_text())
            name = path.stem
        zero = config.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0))

        def offloaded(key: str) -> bool:
            device = (zero.get(key) or {}).get("device", "none")
            return str(device).lower() in ("cpu", "nvme")

        def value(key: str, default: float | str) -> float | str:
            v = zero.get(key, default)
            return v if v == "auto" else float(v)

        return cls(
            stage=stage,
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
            reduce_bucket_size=value("reduce_bucket_size", C.DS_DEFAULTS["reduce_bucket_size"]),
            allgather_bucket_size=value("allgather_bucket_size", C.DS_DEFAULTS["allgather_bucket_size"]),
            prefetch_bucket_size=value("stage3_prefetch_bucket_size", C.DS_DEFAULTS["stage3_prefetch_bucket_size"]),
            param_persistence_threshold=value(
                "stage3_param_persistence_threshold", C.DS_DEFAULTS["stage3_param_persistence_threshold"]
            ),
            max_live_parameters=float(zero.get("stage3_max_live_parameters", C.DS_DEFAULTS["stage3_max_live_parameters"])),
            sub_group_size=float(zero.get("sub_group_size", C.DS_DEFAULTS["sub_group_size"])),
            name=name,
        )

    @classmethod
    def plain(cls) -> ZeroSettings:
        """No DeepSpeed: PyTorch DDP (or one process) with torch AMP."""
        return cls(stage=0, overlap_comm=False, deepspeed=False, name="none")

    # "auto" values, resolved for a model of hidden size h (elements) ----------------------------

    def reduce_bucket(self, hidden: int) -> float:
        return C.AUTO_REDUCE_BUCKET * hidden * hidden if self.reduce_bucket_size == "auto" else float(self.reduce_bucket_size)

    def allgather_bucket(self, hidden: int) -> float:
        return self.reduce_bucket(hidden) if self.allgather_bucket_size == "auto" else float(self.allgather_bucket_size)

    def prefetch_bucket(self, hidden: int) -> float:
        if self.prefetch_bucket_size == "auto":
            return C.AUTO_PREFETCH_BUCKET * hidden * hidden
        return float(self.prefetch_bucket_size)

    def persistence_threshold(self, hidden: int) -> float:
        if self.param_persistence_threshold == "auto":
            return C.AUTO_PERSISTENCE_THRESHOLD * hidden
        return float(self.param_persistence_threshold)

    def describe(self) -> str:
        if not self.deepspeed:
            return "no DeepSpeed (DDP)"
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer:
            parts.append("optimizer offloaded")
        if self.offload_param:
            parts.append("parameters offloaded")
        return ", ".join(parts)


def profile_path(name: str) -> Path:
    """Path of a shipped profile."""
    return PROFILE_DIR / f"{name}.json"


__all__ = ["PROFILE_DIR", "PROFILE_NAMES", "ZeroSettings", "profile_path"]
