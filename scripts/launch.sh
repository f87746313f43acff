#!/usr/bin/env bash
# Shared launcher of finetune_lora.sh and finetune_full.sh (which set OUTPUT_DIR, MEMORY_PROFILE and LR
# and pass their mode's arguments); see their headers for usage. Every setting is an environment
# variable; arguments are passed on to finetune.py after these defaults, so they override them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:?set MODEL to a model directory}
DATA=${DATA:?set DATA to training data (.json/.jsonl, comma-separated)}
EVAL_DATA=${EVAL_DATA:-}
OUTPUT_DIR=${OUTPUT_DIR:?}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MEMORY_PROFILE=${MEMORY_PROFILE:?}
GPU_MEMORY=${GPU_MEMORY:-32}
PRECISION=${PRECISION:-fp16}
BATCH_SIZE=${BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-8}
EPOCHS=${EPOCHS:-3}
LR=${LR:?}
MAX_LENGTH=${MAX_LENGTH:-2048}
MAX_SLICE_NUMS=${MAX_SLICE_NUMS:-9}
TUNE_VISION=${TUNE_VISION:-false}
TUNE_RESAMPLER=${TUNE_RESAMPLER:-}  # empty: the default (full runs train it, LoRA runs do not)
SAVE_STEPS=${SAVE_STEPS:-500}
REPORT_TO=${REPORT_TO:-tensorboard}

ARGS=(
  --model_name_or_path "$MODEL" --data_path "$DATA"
  --tune_vision "$TUNE_VISION"
  --"$PRECISION" true
  --output_dir "$OUTPUT_DIR" --resume_from_checkpoint auto
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 0.03 --lr_scheduler_type cosine
  --model_max_length "$MAX_LENGTH" --max_slice_nums "$MAX_SLICE_NUMS"
  --save_steps "$SAVE_STEPS" --save_total_limit 3 --report_to "$REPORT_TO"
)
[ -n "$TUNE_RESAMPLER" ] && ARGS+=(--tune_resampler "$TUNE_RESAMPLER")
[ -n "$EVAL_DATA" ] && ARGS+=(--eval_data_path "$EVAL_DATA" --eval_strategy steps --eval_steps "$SAVE_STEPS")
if [ "$MEMORY_PROFILE" = auto ]; then
  MEMORY_PROFILE=$(python -m finetune memory --pick-profile --num_gpus $((GPUS_PER_NODE * NNODES)) \
    --gpu_memory "$GPU_MEMORY" "${ARGS[@]}" "$@")
fi
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  finetune.py "${ARGS[@]}" --deepspeed "$MEMORY_PROFILE" "$@"
