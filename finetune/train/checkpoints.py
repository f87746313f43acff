"""Checkpoint completeness and `--resume_from_checkpoint auto`.

The Trainer writes a checkpoint in place (checkpoint-N/), so a run killed while saving leaves a
partial directory that transformers' get_last_checkpoint would pick. We mark a checkpoint complete
only after every file of it is written (`CheckpointMarker.on_save`, called once the Trainer's save,
DeepSpeed's included, has returned) and resume from the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

COMPLETE_MARKER = "finetune_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step checkpoint-N directory of `output_dir` that carries the completion marker."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / COMPLETE_MARKER).is_file()
    ]
    return max(complete)[1] if complete else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """'auto' -> newest complete checkpoint (or None: a fresh start); a path -> itself, checked."""
    if value is None:
        return None
    if value == "auto":
        found = newest_complete_checkpoint(output_dir)
        return None if found is None else str(found)
    if not (Path(value) / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"{value} is not a complete checkpoint (no {COMPLETE_MARKER}); it may have been cut off "
            f"while saving. Use --resume_from_checkpoint auto to take the newest complete one."
        )
    return value


class CheckpointMarker(TrainerCallback):
    """Marks checkpoint-N complete after the Trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shards and RNG state are written
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            temporary = folder / f".{COMPLETE_MARKER}.tmp"
            temporary.write_text(json.dumps({"global_step": state.global_step}) + "\n")
            os.replace(temporary, folder / COMPLETE_MARKER)  # atomic: the marker is whole or absent
        return control


__all__ = ["COMPLETE_MARKER", "CheckpointMarker", "newest_complete_checkpoint", "resolve_resume"]
