"""Two CPU ranks under torchrun with Trainer + DeepSpeed ZeRO-2 shard the data (finetune.train.distributed)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "ranks_see_disjoint.py"
ZERO2_AUTO = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ranks_train_on_disjoint_halves(tmp_path):
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps(ZERO2_AUTO))
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(tmp_path), str(ds_config),
    ]
    # DeepSpeed JIT-builds its CPU shm comm op on the very first run (cached afterwards): allow for it.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen0, seen1 = set(records[0]["seen"]), set(records[1]["seen"])
    assert not seen0 & seen1, f"ranks trained on the same samples: {sorted(seen0)} / {sorted(seen1)}"
    assert seen0 | seen1 == set(range(16)), (sorted(seen0), sorted(seen1))
    for rank, rec in enumerate(records):
        assert len(rec["seen"]) == 8, rec["seen"]
        assert rec["dist_world_size"] == 2
        assert (rec["args_world_size"], rec["args_process_index"]) == (2, rank)
        assert rec["deepspeed_enabled"] and rec["zero_stage"] == 2
        # "auto" resolved with the real world size: 2 per rank * 2 accumulation steps * 2 ranks
        assert (rec["train_batch_size"], rec["micro_batch_size"], rec["gradient_accumulation_steps"]) == (8, 2, 2)
