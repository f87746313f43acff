"""The training recipe: `finetune train`, `python -m finetune train` and `torchrun finetune.py`.

Order matters and reads top to bottom: arguments are validated before anything loads; the data is
validated in full before the model loads (a bad sample costs seconds, not a model load); then the
model, what is trained, and the Trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, set_seed

from ..data.check import DataReport, check_data
from ..data.collator import LengthGroupedSampler
from ..data.dataset import ConversationDataset, DataSettings, SampleEncoder, load_sample_encoder
from ..data.errors import DataErrors
from ..memory.profile import MemoryProfileCallback, predict_run
from ..models.config import detect_family
from ..models.loading import load_model, read_config
from .args import check_llm_type, parse_args
from .callbacks import NonFiniteCallback, SampleGenerationCallback, ThroughputCallback, write_run_record
from .checkpoints import CheckpointMarker, resolve_resume
from .distributed import init_deepspeed_comm
from .trainable import apply_tuning, trainable_summary

logger = logging.getLogger("finetune")

# Files of the base model directory copied into the output. The tokenizer files replace the ones
# the Trainer re-saved in transformers-5 layout, so the output keeps the released layout.
_MODEL_SIDE_FILES = (
    "preprocessor_config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    # transformers-native families: their processor's files, so AutoProcessor reads the output
    "processor_config.json", "video_preprocessor_config.json", "chat_template.jinja",
)


class FinetuneTrainer(Trainer):
    """transformers' Trainer with one change: the length-grouped sampler uses lengths measured by
    validation (images included) and a (seed, epoch) order, so a resumed run replays the same data.
    transformers' own LengthGroupedSampler would measure lengths by loading every sample (every
    image) and draws its order from the global RNG."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length":
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(dataset.lengths, batch_size=batch, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)


def _validated_dataset(path: str, encoder: SampleEncoder, data_args, training_args, name: str) -> ConversationDataset:
    report: DataReport = check_data(path, encoder, image_root=data_args.image_root)
    logger.info("%s data %s:\n%s", name, path, report.summary(data_args.model_max_length, encoder.settings.truncate))
    if report.errors:
        if not data_args.skip_invalid_samples:
            raise DataErrors(report.errors)
        skipped = Path(training_args.output_dir) / f"skipped_samples_{name}.jsonl"
        if training_args.process_index == 0:
            skipped.parent.mkdir(parents=True, exist_ok=True)
            skipped.write_text("".join(json.dumps({"error": str(e), **dataclasses.asdict(e)}) + "\n"
                                       for e in report.errors))
        logger.warning("%s data: %d samples skipped (--skip_invalid_samples), listed in %s",
                       name, len(report.errors), skipped)
    if len(report.lengths) == 0:
        raise DataErrors(report.errors) if report.errors else ValueError(f"{path}: no samples")
    return ConversationDataset(report.records, encoder, report.lengths)


def _model_dtype(training_args) -> torch.dtype:
    # Under DeepSpeed the engine keeps fp32 master weights itself; loading in the compute dtype
    # halves host memory. Plain torch AMP needs fp32 weights for its grad scaler.
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    if training_args.bf16:
        return torch.bfloat16
    return torch.float32


def _wandb_offline_without_credentials(training_args) -> None:
    # wandb asks for a login (and hangs a non-interactive job) without credentials; runs then log
    # offline into ./wandb, to be synced later with `wandb sync`.
    if "wandb" in training_args.report_to and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        if not (Path.home() / ".netrc").is_file():
            os.environ["WANDB_MODE"] = "offline"
            logger.info("wandb: no credentials found, logging offline (sync later with `wandb sync`)")


def train(argv: list[str]) -> Path:
    """Runs training; returns the output directory (adapter or full model, tokenizer, records)."""
    model_args, data_args, tuning_args, training_args = parse_args(argv)
    if training_args.deepspeed:
        init_deepspeed_comm()  # ZeRO-3's zero.Init inside from_pretrained asks it for the world size
    model_dir = model_args.model_name_or_path
    config = read_config(model_dir)
    family = detect_family(config)
    check_llm_type(model_args.llm_type, config)
    prediction = predict_run(model_args, data_args, tuning_args, training_args)
    _wandb_offline_without_credentials(training_args)

    settings = DataSettings(
        family=family,
        query_num=config.get("query_num", 0),  # 2.x only
        max_slice_nums=data_args.max_slice_nums,
        model_max_length=data_args.model_max_length,
        truncate=data_args.truncation == "turns",
    )
    encoder = load_sample_encoder(model_dir, settings)
    tokenizer, tokens = encoder.tokenizer, encoder.tokens
    train_dataset = _validated_dataset(data_args.data_path, encoder, data_args, training_args, "train")
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = _validated_dataset(data_args.eval_data_path, encoder, data_args, training_args, "eval")

    # Seed before the model exists: LoRA's A matrices (and any newly initialised weight) are drawn
    # here, before the Trainer seeds; unseeded, two runs of one command would differ.
    set_seed(training_args.seed)
    model = load_model(model_dir, dtype=_model_dtype(training_args), attn_implementation=model_args.attn_implementation)
    model = apply_tuning(model, tuning_args, tokens)
    logger.info("family %s from %s\n%s", family, model_dir, trainable_summary(model))
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings under
        # LoRA work without enable_input_require_grads.
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}

    if training_args.process_index == 0:
        write_run_record(training_args.output_dir, {
            "model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
            "tuning": dataclasses.asdict(tuning_args), "training": training_args.to_dict(), "family": family,
        })
    callbacks = [ThroughputCallback(), NonFiniteCallback(), CheckpointMarker(), MemoryProfileCallback(prediction)]
    if data_args.eval_generate_samples and eval_dataset is not None:
        count = min(data_args.eval_generate_samples, len(eval_dataset))
        records = [eval_dataset.records[i] for i in range(count)]
        callbacks.append(SampleGenerationCallback(records, encoder, encoder.collator()))
    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=encoder.collator(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        for name in _MODEL_SIDE_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy(Path(model_dir) / name, Path(training_args.output_dir) / name)
    return Path(training_args.output_dir)


__all__ = ["FinetuneTrainer", "train"]
