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

ZeRO-3 follow-up: on this path accelerate initialises `torch.distributed` but not DeepSpeed's own
communication layer (on a GPU, `PartialState` does it through `deepspeed.comm.init_distributed`).
`from_pretrained` under ZeRO-3 enters `deepspeed.zero.Init`, whose `DeepSpeedConfig.__init__`
(`deepspeed/runtime/config.py`) takes the world size from `deepspeed.comm` and falls back to 1 when
it is not initialised, so "auto" `train_batch_size` fails its batch assertion there. Call
`init_deepspeed_comm()` after `TrainingArguments` and before loading the model: it wraps the
existing group (`deepspeed.comm.init_distributed`: "user initialized torch.dist themselves").

Trap: the environment variable `ACCELERATE_USE_CPU=1` is NOT equivalent. `AcceleratorState.__init__`
reads it too and forces `cpu=True` there, so DeepSpeed is silently dropped (`Trainer.
is_deepspeed_enabled` is False) and the run is plain DDP; `cpu_training_args_kwargs` refuses it.

GPU path: `cpu_training_args_kwargs` adds `use_cpu` only when CUDA is unavailable and DeepSpeed's
accelerator is the CPU, so an NCCL launch goes through the unchanged library path
(`_prepare_backend` -> "nccl"/MULTI_GPU, `deepspeed.comm.init_distributed("nccl")`).

Single process (`python train.py`, no launcher), CPU or GPU: `deepspeed.initialize` calls
`deepspeed/comm/comm.py: init_distributed(auto_mpi_discovery=True)`; without RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and LOCAL_RANK in the environment it falls back to `mpi_discovery`, which
fails with `ModuleNotFoundError: mpi4py`. The training entrypoint calls `fill_single_process_env()`
first (before `TrainingArguments`): it sets a one-rank launcher environment (what `deepspeed
--num_gpus 1` would set) when no launcher did, and is a no-op under torchrun/deepspeed/accelerate/mpirun.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["deepspeed_on_cpu", "fill_single_process_env", "cpu_training_args_kwargs", "init_deepspeed_comm"]

_TRUE = ("1", "true", "yes", "on", "y", "t")
# Variables a launcher (torchrun, deepspeed, accelerate launch, mpirun) sets for each process.
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def deepspeed_on_cpu() -> bool:
    """True when there is no CUDA device and DeepSpeed's accelerator is the CPU."""
    import torch

    if torch.cuda.is_available():
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def fill_single_process_env() -> bool:
    """Set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for one rank when no launcher set any.

    Needed by DeepSpeed in a run started without a launcher (see the module docstring); call it at
    the start of training, before `TrainingArguments`. Returns whether it set anything.
    """
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return False
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    return True


def cpu_training_args_kwargs(deepspeed: Any) -> dict[str, Any]:
    """Extra `TrainingArguments` kwargs; call it before `TrainingArguments` is built.

    `deepspeed`: the DeepSpeed config (path or dict), or just whether one is used. Returns `{}`
    without DeepSpeed or on a GPU machine, `{"use_cpu": True}` for DeepSpeed on a CPU-only machine.
    No side effects (see `fill_single_process_env` for runs without a launcher).
    """
    if not deepspeed or not deepspeed_on_cpu():
        return {}
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        raise RuntimeError(
            "ACCELERATE_USE_CPU is set: accelerate would silently disable DeepSpeed and run plain DDP. "
            "Unset it; DeepSpeed on the CPU is enabled through TrainingArguments(use_cpu=True)."
        )
    return {"use_cpu": True}


def init_deepspeed_comm() -> None:
    """On the CPU, give DeepSpeed's comm layer the process group accelerate created; else no-op.

    Call after `TrainingArguments` (built with `cpu_training_args_kwargs`) and before a ZeRO-3
    `from_pretrained`. Safe to call more than once.
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not deepspeed_on_cpu():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
