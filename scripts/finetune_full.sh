#!/usr/bin/env bash
# Full fine-tuning, defaults for 2 x V100-32GB: fp16, DeepSpeed ZeRO-3 with optimizer and parameters
# offloaded to the CPU, language model and resampler trained (TUNE_VISION=true adds the vision encoder).
#
#   MODEL=/models/MiniCPM-Llama3-V-2_5 DATA=data/train.json bash scripts/finetune_full.sh
#   MEMORY_PROFILE=auto ... bash scripts/finetune_full.sh      # cheapest ds_configs profile predicted to fit
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ... bash scripts/finetune_full.sh   # run on every node
#
# Settings (environment): as scripts/finetune_lora.sh, without LORA_R/LORA_ALPHA.
set -euo pipefail
export OUTPUT_DIR=${OUTPUT_DIR:-output/full} MEMORY_PROFILE=${MEMORY_PROFILE:-ds_configs/zero3_offload.json} LR=${LR:-1e-5}
exec bash "$(dirname "$0")/launch.sh" --tune_llm true "$@"
