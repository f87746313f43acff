"""`MemoryProfileCallback`: every run records the prediction it started with and what each rank used.

The recipe adds it to the Trainer with the estimate made at start::

    callbacks=[..., MemoryProfileCallback(prediction=estimate(...).to_json())]

It writes `<output_dir>/memory_profile.json` after the first `first_steps` optimizer steps (when the
peak of a step has been reached) and again at the end of training::

    {"prediction": {...},                       # MemoryEstimate.to_json(), or whatever was passed
     "measured": {"after_step_3": [per rank], "end": [per rank]}}

Per rank, on a GPU: `torch.cuda.max_memory_allocated` / `max_memory_reserved` and the device's
total memory (GiB); on the CPU: the process's peak RSS (`resource.getrusage`). Ranks are gathered
with `torch.distributed.all_gather_object` when a process group is up (every rank must run the
callback, as the Trainer does); rank 0 writes. A rank within 5% of its GPU's memory is logged as a
warning: the next longer sample or larger image may not fit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("finetune")

GIB = 1024**3
# A rank whose reserved memory is within this fraction of the GPU's total is warned about.
NEAR_FULL_FRACTION = 0.05


def measure_rank() -> dict[str, Any]:
    """This process's peak memory so far (GiB): GPU allocated/reserved, or host RSS on the CPU."""
    import resource

    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    # ru_maxrss is KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if os.uname().sysname == "Darwin" else rss * 1024
    record: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "peak_rss_gib": round(rss_bytes / GIB, 3)}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        record.update(
            device=torch.cuda.get_device_name(device),
            max_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            max_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            total_gib=round(torch.cuda.get_device_properties(device).total_memory / GIB, 3),
        )
    else:
        record["device"] = "cpu"
    return record


def predict_run(model_args, data_args, tuning_args, training_args) -> dict[str, Any]:
    """The estimate for a parsed training run, as `MemoryProfileCallback` stores it.

    Never raises: a run must not fail because its memory could not be predicted; the reason is
    stored instead (e.g. a model family the estimator does not cover).
    """
    try:
        import torch

        from .cli import run_spec

        spec = run_spec(model_args, data_args, tuning_args, training_args)
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else float("inf")
        return spec.estimate(max(1, int(training_args.world_size)), gpu_gib, None).to_json()
    except Exception as error:  # noqa: BLE001 - recorded, never fatal
        return {"error": f"{type(error).__name__}: {error}"}


def _gather(record: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        records: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(records, record)
        return records
    return [record]


class MemoryProfileCallback(TrainerCallback):
    """Writes the prediction and the measured per-rank peaks to `<output_dir>/memory_profile.json`.

    Args:
        prediction: the estimate made at start (`MemoryEstimate.to_json()`), stored as given.
        first_steps: measure after this many optimizer steps, besides at the end.
        measure: the per-rank measurement (replaceable in tests).
    """

    def __init__(self, prediction: dict[str, Any] | None, first_steps: int = 3, measure=measure_rank) -> None:
        self.prediction = prediction
        self.first_steps = first_steps
        self.measure = measure
        self.measured: dict[str, list[dict[str, Any]]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first_steps:
            self._record(f"after_step_{self.first_steps}", args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._record("end", args, state)

    def _record(self, name: str, args, state) -> None:
        records = _gather(self.measure())
        self.measured[name] = records
        if not state.is_world_process_zero:
            return
        for r in records:
            total, reserved = r.get("total_gib"), r.get("max_reserved_gib")
            if total and reserved is not None and reserved >= (1 - NEAR_FULL_FRACTION) * total:
                logger.warning(
                    "rank %s peaked at %.1f of %.1f GiB on %s (%s): within %d%% of the GPU's memory; a longer "
                    "sample or a larger image may not fit (see `finetune memory`)",
                    r["rank"], reserved, total, r.get("device"), name, round(100 * NEAR_FULL_FRACTION),
                )
        path = Path(args.output_dir) / "memory_profile.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prediction": self.prediction, "measured": self.measured}, indent=2) + "\n")
        predicted = (self.prediction or {}).get("per_gpu_peak_gib")
        peaks = [r.get("max_reserved_gib", r["peak_rss_gib"]) for r in records]
        logger.info("memory (%s): peak %.2f GiB per rank (max over %d), predicted %s; written to %s",
                    name, max(peaks), len(records), "-" if predicted is None else f"{predicted:.2f} GiB", path)


__all__ = ["MemoryProfileCallback", "measure_rank", "predict_run"]
