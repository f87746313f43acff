"""The published memory figures the estimator is calibrated against, and the one fitted constant.

Run book::

    python -m finetune.memory.calibration           # table of predictions vs the published figures
    python -m finetune.memory.calibration --fit     # refit TRANSIENT_OVERHEAD (prints the value)

Source: OpenBMB/MiniCPM-V finetune/readme.md. MiniCPM-Llama3-V 2.5, A100-80G, bf16, batch 1, length
2048, gradient checkpointing. ZeRO-2 table (commit 0dac238, late May 2024); ZeRO-3 with optimizer and
parameters offloaded to the CPU (added with OpenBMB/MiniCPM-V#200, June 2024, kept in later readmes).
Both tables predate the reference's July 2024 LoRA rewrite, so the LoRA rows train the adapters on
q/k/v/o (r=64) and the input embedding in place, with the vision encoder and resampler frozen
(`recipe="reference"`, see estimate.plan_training).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from . import constants as C
from .estimate import DEFAULT_LORA_TARGETS, estimate
from .zero import ZeroSettings

# config.json of openbmb/MiniCPM-Llama3-V-2_5 (spec [V25]), the fields that shape the model; kept
# here so the calibration needs no download.
MINICPM_LLAMA3_V2_5 = {
    "model_type": "minicpmv", "version": "2.5", "architectures": ["MiniCPMV"], "attention_bias": False,
    "attention_dropout": 0.0, "batch_vision_input": True, "bos_token_id": 128000, "drop_vision_last_layer": False,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "image_size": 448,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "mm_use_im_start_end": True, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "patch_size": 14, "pretraining_tp": 1, "query_num": 96, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
    "slice_mode": True, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": False,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
    "vocab_size": 128256,
}
REFERENCE_MODEL = MINICPM_LLAMA3_V2_5
A100_GIB = 80.0
# The reference scripts' flags: finetune_lora.sh (--use_lora true --tune_vision true) and
# finetune_ds.sh (--tune_llm true --tune_vision true); --tune_embeddings full names the reference's
# trained embedding matrix in this toolkit's terms.
REFERENCE_LORA = {"use_lora": True, "tune_vision": True, "tune_embeddings": "full", "lora_r": 64,
                  "lora_target_modules": DEFAULT_LORA_TARGETS}
REFERENCE_FULL = {"tune_llm": True, "tune_vision": True, "tune_embeddings": "full"}


# The reference's DeepSpeed configs as measured: ds_config_zero2.json with 2e8-element reduce and
# all-gather buckets (this toolkit's zero2.json has smaller ones); its ZeRO-3 offload config is
# ds_configs/zero3_offload.json's.
REFERENCE_PROFILES = {
    "zero2": ZeroSettings(stage=2, overlap_comm=True, reduce_bucket_size=2e8, allgather_bucket_size=2e8,
                          name="reference ds_config_zero2"),
    "zero3_offload": "zero3_offload",
}


@dataclass(frozen=True)
class Point:
    profile: str
    method: str  # "lora" or "full"
    num_gpus: int
    measured_gib: float | None  # None: out of memory on 80 GiB


POINTS = (
    Point("zero2", "lora", 2, 31.2), Point("zero2", "lora", 4, 29.3), Point("zero2", "lora", 8, 28.4),
    Point("zero2", "full", 2, None), Point("zero2", "full", 4, 75.0), Point("zero2", "full", 8, 51.2),
    Point("zero3_offload", "lora", 2, 14.4), Point("zero3_offload", "lora", 4, 13.6),
    Point("zero3_offload", "lora", 8, 13.1),
    Point("zero3_offload", "full", 2, 16.0), Point("zero3_offload", "full", 4, 15.8),
    Point("zero3_offload", "full", 8, 15.63),
)


def predict(point: Point, model=REFERENCE_MODEL, **overrides):
    """The estimator's prediction for one published point (the reference recipe's settings)."""
    kwargs = dict(
        num_gpus=point.num_gpus, gpu_memory_gib=A100_GIB,
        tuning=REFERENCE_LORA if point.method == "lora" else REFERENCE_FULL,
        model_max_length=2048, max_slice_nums=9, batch_size=1, dtype="bf16", zero=REFERENCE_PROFILES[point.profile],
        gradient_checkpointing=True, recipe="reference",
    )
    kwargs.update(overrides)
    return estimate(model, **kwargs)


def table(model=REFERENCE_MODEL) -> list[dict]:
    rows = []
    for point in POINTS:
        e = predict(point, model)
        error = None if point.measured_gib is None else e.per_gpu_peak_gib / point.measured_gib - 1
        rows.append({"profile": point.profile, "method": point.method, "num_gpus": point.num_gpus,
                     "measured_gib": point.measured_gib, "predicted_gib": round(e.per_gpu_peak_gib, 1),
                     "error": None if error is None else round(error, 3)})
    return rows


def fit_transient_overhead(model=REFERENCE_MODEL) -> float:
    """Least squares in log space over the eleven measured points: the one fitted constant.

    The prediction is affine in the overhead (held + overhead x transient), so each point's
    prediction is evaluated at two overheads and the best one found by a fine grid search.
    """
    lines = []
    for point in POINTS:
        if point.measured_gib is None:
            continue
        base, slope = _affine(point, model)
        lines.append((base, slope, point.measured_gib))

    def loss(overhead: float) -> float:
        return sum(math.log((b + s * overhead) / m) ** 2 for b, s, m in lines)

    grid = [1 + i / 1000 for i in range(0, 3001)]
    return min(grid, key=loss)


def _affine(point: Point, model) -> tuple[float, float]:
    """(held, transient) GiB of a point's prediction: peak = held + overhead * transient."""
    e = predict(point, model)
    transient = e.details["phases_gib"][e.details["peak_phase"]]
    held = e.per_gpu_peak_gib - transient * C.TRANSIENT_OVERHEAD
    return held, transient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.memory.calibration", description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit TRANSIENT_OVERHEAD and print it")
    parser.add_argument("--model", default=None, help="MiniCPM-Llama3-V 2.5 model directory (default: its config, built in)")
    args = parser.parse_args(argv)
    model = args.model or REFERENCE_MODEL
    if args.fit:
        print(f"TRANSIENT_OVERHEAD = {fit_transient_overhead(model):.3f}")
    print(f"{'profile':<14} {'method':<5} {'GPUs':>4} {'measured':>9} {'predicted':>9} {'error':>7}")
    for row in table(model):
        measured = "OOM" if row["measured_gib"] is None else f"{row['measured_gib']:.2f}"
        error = "" if row["error"] is None else f"{100 * row['error']:+.1f}%"
        print(f"{row['profile']:<14} {row['method']:<5} {row['num_gpus']:>4} {measured:>9} "
              f"{row['predicted_gib']:>9.1f} {error:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
