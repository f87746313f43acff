#!/usr/bin/env bash
# LoRA fine-tuning, defaults for 2 x V100-32GB: fp16 (V100 has no bf16), DeepSpeed ZeRO-2, LoRA r=64 on
# the language model's attention, resampler trained, vision encoder frozen, gradient checkpointing.
#
#   MODEL=/models/MiniCPM-Llama3-V-2_5 DATA=data/train.json EVAL_DATA=data/eval.json bash scripts/finetune_lora.sh
#   MEMORY_PROFILE=auto ... bash scripts/finetune_lora.sh      # cheapest ds_configs profile predicted to fit
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ... bash scripts/finetune_lora.sh   # run on every node
#
# Settings (environment): MODEL, DATA, EVAL_DATA, OUTPUT_DIR, GPUS_PER_NODE, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, MEMORY_PROFILE (a ds_configs file or auto), GPU_MEMORY (GiB, for auto),
# PRECISION (fp16|bf16), BATCH_SIZE, GRAD_ACCUM, EPOCHS, LR, MAX_LENGTH, MAX_SLICE_NUMS, LORA_R,
# LORA_ALPHA, TUNE_VISION, TUNE_RESAMPLER, SAVE_STEPS, REPORT_TO. Extra arguments go to finetune.py.
set -euo pipefail
export OUTPUT_DIR=${OUTPUT_DIR:-output/lora} MEMORY_PROFILE=${MEMORY_PROFILE:-ds_configs/zero2.json} LR=${LR:-1e-4}
exec bash "$(dirname "$0")/launch.sh" --use_lora true --lora_r "${LORA_R:-64}" --lora_alpha "${LORA_ALPHA:-64}" "$@"
