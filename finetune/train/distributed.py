"""Distributed settings that must be decided before `TrainingArguments` is built.

Root cause: DeepSpeed on a CPU-only machine under `torchrun` (transformers 5.x, accelerate 1.x)
-----------------------------------------------------------------------------------------------
`TrainingArguments` fixes the world size in `transformers/training_args.py:
TrainingArguments._setup_devices` (first reached from `__post_init__`, where
`HfTrainerDeepSpeedConfig.trainer_config_process` in `transformers/integrations/deepspeed.py`
reads `args.world_size` to fill `train_batch_size: "auto"`). With `deepspeed=...` and the default
`use_cpu=False` it builds `accelerate.PartialState(timeout=...)` with `ACCELERATE_USE_DEEPSPEED=true`
and no backend (`ddp_backend` is only forwarded on the `use_cpu` and plain-DDP branches, so
`ddp_backend="gloo"` alone does nothing). In `accelerate/state.py: PartialState`:

1. `_prepare_backend(cpu=False)` picks a backend only for an accelerator (cuda, xpu, npu, ...);
   its gloo/MULTI_CPU branch requires `cpu=True`. Without a GPU it returns `(None, NO)`.
2. `__init__` still sees `LOCAL_RANK` and calls `deepspeed.comm.init_distributed(dist_backend=None)`,
   which uses DeepSpeed's CPU accelerator backend (gloo) and really joins the 2-rank group,
3. but then `if self.backend is None:` sets `num_processes = 1, process_index = 0`.

Every rank thus believes it is rank 0 of 1: "auto" `train_batch_size` becomes micro * grad_acc * 1
and DeepSpeed (which sees world size 2) asserts; with `train_batch_size` left out, training
runs, but `Trainer.get_train_dataloader` -> `Accelerator.prepare` -> `accelerate/data_loader.py:
prepare_data_loader` shards by `state.num_processes`/`process_index` (1/0), so every rank trains
on all the data. Pre-initialising the process group does not help: the `backend is None` branch
ignores it.

Fix: `use_cpu=True`
-------------------
With `use_cpu=True`, `_setup_devices` builds `PartialState(cpu=True, backend=ddp_backend)`:
`_prepare_backend` takes the MULTI_CPU branch (gloo, or `ddp_backend` e.g. "ccl"/"mpi"), the
process group is initialised by accelerate and `num_processes`/`process_index` come from it.
DeepSpeed stays on: the Trainer builds `Accelerator(deepspeed_plugin=...)` without `cpu=`, and
`AcceleratorState.__init__` switches to `DistributedType.DEEPSPEED` (`elif ACCELERATE_USE_DEEPSPEED
... and not cpu`); `deepspeed.initialize` then wraps the existing group (`deepspeed.comm.
init_distributed`: "user initialized torch.dist themselves"). "auto" batch sizes resolve with
the real world size and accelerate shards the dataloader. `use_cpu=True` is also what lets
`bf16=True` pass the TrainingArguments check on a CPU.

Trap: the environment variable `ACCELERATE_USE_CPU=1` is NOT equivalent. `AcceleratorState.__init__`
reads it too and forces `cpu=True` there, so DeepSpeed is silently dropped (`Trainer.
is_deepspeed_enabled` is False) and the run is plain DDP; `cpu_training_args_kwargs` refuses it.

GPU path: the helper returns `{}` whenever CUDA is available or DeepSpeed's accelerator is not the
CPU, so an NCCL launch goes through the unchanged library path. A single process run on the CPU
(`python train.py`, no launcher) gets `use_cpu=True` too; it works without MASTER_ADDR/RANK/...
because `deepspeed.initialize` creates a one-rank group itself (see tests/test_distributed_cpu.py).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["deepspeed_on_cpu", "cpu_training_args_kwargs"]

_TRUE = ("1", "true", "yes", "on", "y", "t")


def deepspeed_on_cpu() -> bool:
    """True when there is no CUDA device and DeepSpeed's accelerator is the CPU."""
    import torch

    if torch.cuda.is_available():
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def cpu_training_args_kwargs(deepspeed: Any) -> dict[str, Any]:
    """Extra `TrainingArguments` kwargs for DeepSpeed on a CPU-only machine, else `{}`.

    Call it before building `TrainingArguments` and pass the result as `**kwargs`.
    """
    if not deepspeed or not deepspeed_on_cpu():
        return {}
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        raise RuntimeError(
            "ACCELERATE_USE_CPU is set: accelerate would silently disable DeepSpeed and run plain DDP. "
            "Unset it; DeepSpeed on the CPU is enabled through TrainingArguments(use_cpu=True)."
        )
    return {"use_cpu": True}
