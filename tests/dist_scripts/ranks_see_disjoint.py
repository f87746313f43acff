"""Run under `torchrun --nproc_per_node 2`: one epoch of a tiny random Llama with Trainer + DeepSpeed
on the CPU, writing per-rank facts (world sizes, resolved batch sizes, sample ids trained on) to
OUT_DIR/rank{RANK}.json.

usage: ranks_see_disjoint.py OUT_DIR DS_CONFIG_JSON
"""

import json
import os
import sys

import torch
from torch.utils.data import Dataset

from finetune.train.distributed import cpu_training_args_kwargs

N_SAMPLES = 16
out_dir, ds_config = sys.argv[1], sys.argv[2]
extra = cpu_training_args_kwargs(ds_config)  # before anything builds TrainingArguments

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402


class IndexedTokens(Dataset):
    """Sample i: 16 random tokens seeded by i, plus its index."""

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone(), "sample_idx": torch.tensor(i)}


class RecordingTrainer(Trainer):
    seen: list[int] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.extend(inputs.pop("sample_idx").tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


args = TrainingArguments(
    output_dir=out_dir,
    deepspeed=ds_config,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    num_train_epochs=1,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    remove_unused_columns=False,
    disable_tqdm=True,
    seed=0,
    **extra,
)
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
)
trainer = RecordingTrainer(model=model, args=args, train_dataset=IndexedTokens())
trainer.train()
engine = trainer.model_wrapped
record = {
    "rank": int(os.environ["RANK"]),
    "args_world_size": args.world_size,
    "args_process_index": args.process_index,
    "dist_world_size": torch.distributed.get_world_size(),
    "deepspeed_enabled": trainer.is_deepspeed_enabled,
    "zero_stage": engine.zero_optimization_stage(),
    "train_batch_size": engine.train_batch_size(),
    "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
    "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
    "seen": trainer.seen,
}
with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
    json.dump(record, f)
