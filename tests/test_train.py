"""The training entry point end to end: 2 CPU ranks under torchrun and DeepSpeed, tiny models.

Tiny random models have a frozen random lm_head whose logits cannot grow large, so the LoRA runs
here also put LoRA on lm_head and the MLPs; the product's defaults are for real models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.models.loading import load_model
from finetune.train.checkpoints import COMPLETE_MARKER

REPO = Path(__file__).parents[1]
SAMPLE = REPO / "finetune" / "data" / "sample"
TINY_LORA = [
    "--use_lora", "true", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0",
    "--lora_target_modules", r"llm\.(lm_head|model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    return env


def _command(model_dir, output_dir, *extra, nproc=2, profile="zero2.json") -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "finetune.py"),
        "--model_name_or_path", str(model_dir), "--data_path", str(SAMPLE / "train.json"),
        "--output_dir", str(output_dir), "--deepspeed", str(REPO / "ds_configs" / profile),
        "--per_device_train_batch_size", "2", "--max_slice_nums", "2", "--report_to", "none",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--dataloader_num_workers", "0",
        *extra,
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _final_losses(output_dir: Path) -> dict[int, float]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return _losses(checkpoints[-1] / "trainer_state.json")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "mode"),
    [("2.0", "lora-zero2"), ("2.5", "lora-zero2"), ("2.6", "lora-zero2"),
     ("2.0", "full-zero3"), ("2.5", "full-zero3"), ("2.6", "full-zero3")],
)
def test_training_learns_the_sample_set(family, mode, tiny_model_dir, tmp_path):
    steps = 16
    if mode == "lora-zero2":
        extra = [*TINY_LORA, "--learning_rate", "1e-2"]
        profile = "zero2.json"
    else:
        extra = ["--tune_llm", "true", "--tune_vision", "true", "--learning_rate", "2e-3"]
        profile = "zero3.json"
    out = tmp_path / "run"
    _run(_command(tiny_model_dir(family), out, *extra, "--max_steps", str(steps), "--save_steps", str(steps),
                  profile=profile))
    losses = _final_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = _mean(losses[s] for s in range(1, 5)), _mean(losses[s] for s in range(steps - 3, steps + 1))
    assert last < 0.85 * first, f"loss did not fall clearly: {losses}"
    # The artefact loads: an adapter on its base, or a full model by itself.
    if mode == "lora-zero2":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(tiny_model_dir(family)), out)
        assert any("lora_B" in name for name, _ in model.named_parameters())
    else:
        assert type(load_model(out)).__name__ == type(load_model(tiny_model_dir(family))).__name__
    record = json.loads((out / "run_config.json").read_text())
    assert record["arguments"]["family"] == family and record["versions"]["torch"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_loss(tiny_model_dir, tmp_path):
    """SIGKILL after the step-4 checkpoint, resume with `auto`: the loss at step 8 equals an unbroken run's."""
    model = tiny_model_dir("2.5")
    args = [*TINY_LORA, "--learning_rate", "1e-2", "--max_steps", "8", "--save_steps", "4", "--lora_dropout", "0.1"]

    unbroken = tmp_path / "unbroken"
    _run(_command(model, unbroken, *args))
    expected = _final_losses(unbroken)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(_command(model, broken, *args), env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (broken / "checkpoint-4" / COMPLETE_MARKER).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "checkpoint-8" / COMPLETE_MARKER).exists(), "killed too late to test anything"

    _run(_command(model, broken, *args, "--resume_from_checkpoint", "auto"))
    resumed = _final_losses(broken)
    assert resumed[8] == pytest.approx(expected[8], rel=1e-4), (resumed, expected)
    assert resumed[5] == pytest.approx(expected[5], rel=1e-4)


def test_invalid_data_is_refused_before_training(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--model_name_or_path", str(tiny_model_dir("2.5")),
         "--data_path", str(SAMPLE / "bad.json"), "--use_lora", "true", "--output_dir", str(out),
         "--report_to", "none"],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nothing was trained" in proc.stderr
    assert "bad.json: sample 0" in proc.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


def test_llm_type_is_checked_against_the_model(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--model_name_or_path", str(tiny_model_dir("2.5")),
         "--data_path", str(SAMPLE / "train.json"), "--use_lora", "true", "--llm_type", "qwen",
         "--output_dir", str(tmp_path / "run"), "--report_to", "none"],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2
    assert ("--llm_type qwen names a qwen2 / qwen3 / qwen3_5_text language model, but this family 2.5 model has a "
            "llama one; pass --llm_type llama3 or drop --llm_type") in proc.stderr


def test_single_process_run_logs_to_tensorboard_and_offline_wandb(tiny_model_dir, tmp_path):
    env = {k: v for k, v in _env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no wandb credentials
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--model_name_or_path", str(tiny_model_dir("2.6")),
         "--data_path", f"{SAMPLE / 'train.json'},{SAMPLE / 'train_llava.jsonl'}", "--use_lora", "true",
         "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
         "--report_to", "wandb", "tensorboard", "--save_strategy", "no", "--max_slice_nums", "2",
         "--eval_data_path", str(SAMPLE / "eval.json"), "--eval_strategy", "steps", "--eval_steps", "2",
         "--eval_generate_samples", "2"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "logging offline" in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    record = json.loads((out / "run_config.json").read_text())
    assert record["arguments"]["data"]["data_path"].endswith("train_llava.jsonl")
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "deepspeed"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    generations = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [(g["step"], g["id"]) for g in generations] == [(2, "eval-cat"), (2, "eval-rocket")]
    assert all(isinstance(g["prediction"], str) and g["reference"] for g in generations)
    profile = json.loads((out / "memory_profile.json").read_text())
    assert profile["prediction"]["per_gpu_peak_gib"] > 0
    assert profile["measured"]["end"][0]["peak_rss_gib"] > 0
