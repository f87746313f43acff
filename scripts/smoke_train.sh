#!/usr/bin/env bash
# The embedded default, end to end on the CPU: a tiny random MiniCPM-Llama3-V 2.5, the bundled sample
# data, LoRA under DeepSpeed ZeRO-2 with 2 ranks. Installs what it needs first.
#
#   bash scripts/smoke_train.sh                      # ~1-2 minutes on 2 cores
#   FAMILY=2.6 MAX_STEPS=40 bash scripts/smoke_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
FAMILY=${FAMILY:-2.5}
MODEL_DIR=${MODEL_DIR:-output/tiny-minicpmv-$FAMILY}
OUTPUT_DIR=${OUTPUT_DIR:-output/smoke-lora-$FAMILY}
NPROC=${NPROC:-2}
MAX_STEPS=${MAX_STEPS:-30}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A tiny random model's frozen lm_head caps how far its logits can move, so the demo also puts LoRA
# on lm_head and the MLPs (real models learn with the default attention-only targets).
TINY_LORA_TARGETS='llm\.(lm_head|model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))'

[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python -m finetune make-tiny --family "$FAMILY" --out "$MODEL_DIR"
.venv/bin/torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29533}" finetune.py \
  --model_name_or_path "$MODEL_DIR" \
  --data_path finetune/data/sample/train.json \
  --eval_data_path finetune/data/sample/eval.json \
  --use_lora true --lora_r 32 --lora_alpha 64 --lora_dropout 0 \
  --lora_target_modules "$TINY_LORA_TARGETS" \
  --deepspeed ds_configs/zero2.json \
  --output_dir "$OUTPUT_DIR" \
  --max_steps "$MAX_STEPS" --per_device_train_batch_size 2 \
  --learning_rate 5e-3 --lr_scheduler_type constant --warmup_steps 0 \
  --eval_strategy steps --eval_steps 10 --eval_generate_samples 2 --save_steps 10 --save_total_limit 2 \
  --max_slice_nums 2 --model_max_length 1024 \
  --dataloader_num_workers 0 --report_to tensorboard "$@"
