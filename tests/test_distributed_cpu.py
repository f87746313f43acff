"""Two CPU ranks under torchrun with Trainer + DeepSpeed ZeRO-2 shard the data (finetune.train.distributed)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "dist_scripts"
SCRIPT = SCRIPTS / "ranks_see_disjoint.py"
IMAGES = Path(__file__).parents[1] / "finetune" / "data" / "sample" / "images"
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


def _torchrun_two_ranks(script: Path, *args) -> None:
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(script), *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


@pytest.mark.slow
def test_two_cpu_ranks_train_on_disjoint_halves(tmp_path):
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps(ZERO2_AUTO))
    # DeepSpeed JIT-builds its CPU shm comm op on the very first run (cached afterwards): allow for it.
    _torchrun_two_ranks(SCRIPT, tmp_path, ds_config)

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


@pytest.mark.slow
def test_two_ranks_share_the_image_decoding_of_validation(tmp_path, tiny_model_dir):
    # Five distinct image files (one named by two samples, one corrupt) and one missing file.
    names = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "page.jpg"]
    for name in names:
        shutil.copy(IMAGES / name, tmp_path / name)
    (tmp_path / "corrupt.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes()[:1500])
    files = names + ["corrupt.jpg", "chelsea.jpg", "missing.jpg"]
    samples = [
        {"id": f"s{k}", "image": file, "conversations": [
            {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]}
        for k, file in enumerate(files)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    _torchrun_two_ranks(SCRIPTS / "ranks_share_image_checks.py", tmp_path, data, tiny_model_dir("2.6"))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    decoded = [set(rank["decoded"]) for rank in ranks]
    existing, missing = {str(tmp_path / name) for name in names + ["corrupt.jpg"]}, str(tmp_path / "missing.jpg")
    # Each existing file is decoded once, by one rank; a missing one costs a stat, on every rank.
    assert decoded[0] & decoded[1] == {missing} and decoded[0] | decoded[1] == existing | {missing}, decoded
    assert sorted(len(rank["decoded"]) for rank in ranks) == [3, 4], decoded
    assert ranks[0]["errors"] == ranks[1]["errors"] and ranks[0]["lengths"] == ranks[1]["lengths"]
    errors = ranks[0]["errors"]
    assert len(errors) == 2 and len(ranks[0]["lengths"]) == 5, errors
    assert 'sample 4 (id "s4"), field image: image file is corrupt or truncated' in errors[0], errors
    assert 'sample 6 (id "s6"), field image: image file not found' in errors[1], errors


@pytest.mark.slow
def test_ranks_that_see_different_image_files_stop_with_a_data_error(tmp_path, tiny_model_dir):
    # Node-local copies that differ: the round-robin split would leave images unchecked.
    for rank, names in enumerate([["chelsea.jpg", "coffee.jpg"], ["chelsea.jpg"]]):
        (tmp_path / f"images{rank}").mkdir()
        for name in names:
            shutil.copy(IMAGES / name, tmp_path / f"images{rank}" / name)
    samples = [
        {"id": name, "image": name, "conversations": [
            {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]}
        for name in ["chelsea.jpg", "coffee.jpg"]
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    _torchrun_two_ranks(SCRIPTS / "ranks_share_image_checks.py", tmp_path, data, tiny_model_dir("2.6"), tmp_path / "images")

    for rank in (0, 1):
        stopped = json.loads((tmp_path / f"rank{rank}.json").read_text())["stopped"]
        assert f"{data}: the ranks of this job see different image files; give every node the same data and " \
               "images (a shared file system or identical copies)" in [line.strip() for line in stopped.splitlines()], stopped
