"""Training arguments: model, data and tuning dataclasses plus transformers' TrainingArguments.

Names follow the reference recipe (OpenBMB/MiniCPM-V finetune.py) wherever it has one, so its users'
launch scripts keep working. Everything is validated together, before anything loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..models.config import detect_family
from .distributed import cpu_training_args_kwargs, fill_single_process_env

DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
VISION_LORA_TARGETS = r"vpm\..*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|attn\.(qkv|proj))"
# --llm_type values and the language models (config.json model_type) each names: the reference recipe's
# minicpm, llama3 and qwen (its 2.6 scripts also pass qwen2), and qwen3 for Qwen3-based models. The flag
# is only checked; the family and its chat format are read from config.json.
LLM_TYPES = {
    "minicpm": ("minicpm",),
    "llama3": ("llama",),
    "qwen": ("qwen2", "qwen3", "qwen3_5_text"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3", "qwen3_5_text"),
}
# The 2.x families' language models (their config.json flattens it into the top level); llava and 4.6
# name theirs in text_config.
_FAMILY_LANGUAGE_MODELS = {"2.0": "minicpm", "2.5": "llama", "2.6": "qwen2"}


class ConfigError(ValueError):
    """One or more arguments are invalid or cannot be combined; the message lists every problem."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub-format model directory (config.json, safetensors, tokenizer)."}
    )
    llm_type: str | None = field(
        default=None,
        metadata={"help": "Accepted for reference-recipe scripts and checked against the model's language "
                  "model (minicpm: 2.0; llama3: 2.5, llava with Llama-3; qwen or qwen2: 2.6; qwen or qwen3: "
                  "4.6); never needed."},
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa", metadata={"help": "Attention kernel of the language model and vision encoder."}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: .json/.jsonl files, comma-separated."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out data for eval loss."})
    image_root: str | None = field(
        default=None, metadata={"help": "Directory image paths are relative to (default: the data file's)."}
    )
    model_max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens, images included."})
    max_slice_nums: int = field(default=9, metadata={"help": "Most slices per image besides the source."})
    truncation: Literal["turns", "reject"] = field(
        default="turns",
        metadata={"help": "Over-long samples: drop whole exchanges from the end (turns) or refuse them."},
    )
    eval_generate_samples: int = field(
        default=0,
        metadata={"help": "At each evaluation, answer the first N held-out conversations and append them "
                  "to <output_dir>/eval_generations.jsonl."},
    )
    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Train without the samples validation refuses, listing them in "
                  "<output_dir>/skipped_samples.jsonl (default: refuse to start)."},
    )


@dataclass
class TuningArguments:
    tune_llm: bool = field(default=False, metadata={"help": "Fully train the language model."})
    tune_vision: bool = field(default=False, metadata={"help": "Fully train the vision encoder."})
    tune_resampler: bool | None = field(
        default=None, metadata={"help": "Train the resampler (default: yes in full runs, no with --use_lora)."}
    )
    tune_embeddings: Literal["none", "new_tokens", "full"] = field(
        default="none",
        metadata={"help": "Input embeddings: frozen, only the special tokens' rows (LoRA runs), or all rows."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS,
        metadata={"help": "Regex over module names, or comma-separated module names, that get LoRA."},
    )
    lora_on_vision: bool = field(
        default=False, metadata={"help": "Also put LoRA on the vision encoder's attention."}
    )

    def __post_init__(self) -> None:
        if self.tune_resampler is None:
            # LoRA adapts the language model and keeps the resampler as released, as LLaMA-Factory's
            # and ms-swift's LoRA defaults keep the projector; training it too costs about 1 GiB per
            # GPU for 2.5 on two GPUs (docs/memory.md, "The V100 target").
            self.tune_resampler = not self.use_lora


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults for this model family."""

    # One sample per GPU step (raise gradient_accumulation_steps for larger batches): a sample can
    # carry ten image slices and 2048 tokens.
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per GPU per step."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Samples per GPU per eval step."})
    # The batch carries pixel_values, tgt_sizes and image_bound, which the Trainer must not drop.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every batch key."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "group_by_length (default: batches of similar length, little padding), random or sequential."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Where to log: tensorboard, wandb, none, ..."}
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count tokens for tokens/s: non_padding, all or no."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'auto': the newest complete checkpoint in output_dir, if any; or a checkpoint path."},
    )


    def __post_init__(self):
        # Checkpointing is on unless asked otherwise, under either name (reference scripts still pass
        # the deprecated --gradient_checkpointing).
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TuningArguments, FinetuneTrainingArguments)


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    values = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of argument names to values")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown arguments {', '.join(unknown)}")
    return values


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TuningArguments, FinetuneTrainingArguments]:
    """Parses `[--config FILE.yaml|json] [--arg value ...]`; command-line values override the file's.

    Raises:
        ConfigError: unknown arguments (in the file or on the command line) or invalid combinations.
    """
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments.")
    file_values: dict = {}
    if "--config" in argv:
        at = argv.index("--config")
        file_values = _read_config_file(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    # DeepSpeed on a CPU-only machine must be set up before TrainingArguments exists (see
    # distributed.py); the file's values and the command line still override this default.
    uses_deepspeed = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) or bool(
        file_values.get("deepspeed")
    )
    if uses_deepspeed:
        fill_single_process_env()  # `python -m finetune train` without a launcher: a 1-rank group
    parser.set_defaults(output_dir="output/run", **cpu_training_args_kwargs(uses_deepspeed), **file_values)
    model_args, data_args, tuning_args, training_args, _config, extra = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if extra:
        raise ConfigError(f"unknown arguments: {' '.join(extra)}")
    validate_args(model_args, data_args, tuning_args, training_args)
    return model_args, data_args, tuning_args, training_args


def validate_args(model_args, data_args, tuning_args, training_args) -> None:
    """Checks every argument and combination at once, before any model or data loads."""
    problems = []
    if not model_args.model_name_or_path:
        problems.append("--model_name_or_path is required (a hub-format model directory)")
    if not data_args.data_path:
        problems.append("--data_path is required (.json or .jsonl conversation files)")
    if model_args.llm_type is not None and model_args.llm_type not in LLM_TYPES:
        problems.append(f"--llm_type {model_args.llm_type!r} is not one of {', '.join(LLM_TYPES)} (and is not needed)")
    if tuning_args.use_lora and tuning_args.tune_llm:
        problems.append("--use_lora trains adapters on the language model; drop --tune_llm (or --use_lora)")
    if tuning_args.tune_embeddings == "new_tokens" and not tuning_args.use_lora:
        problems.append("--tune_embeddings new_tokens needs --use_lora; full runs use --tune_embeddings full")
    if not any([tuning_args.use_lora, tuning_args.tune_llm, tuning_args.tune_vision, tuning_args.tune_resampler,
                tuning_args.tune_embeddings != "none"]):
        problems.append("nothing would be trained: set --use_lora, --tune_llm, --tune_vision or --tune_resampler")
    if data_args.model_max_length < 64:
        problems.append(f"--model_max_length {data_args.model_max_length} is too short to hold an image")
    if data_args.max_slice_nums < 1:
        problems.append(f"--max_slice_nums must be at least 1, got {data_args.max_slice_nums}")
    if training_args.fp16 and training_args.bf16:
        problems.append("--fp16 and --bf16 are exclusive; V100s need --fp16, Ampere and newer can use --bf16")
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))


def check_llm_type(llm_type: str | None, config: dict) -> None:
    """Refuses an --llm_type that does not name the language model of the model `config` (config.json) describes."""
    if llm_type is None:
        return
    family = detect_family(config)
    language_model = _FAMILY_LANGUAGE_MODELS.get(family) or (config.get("text_config") or {}).get("model_type")
    if language_model not in LLM_TYPES[llm_type]:
        fitting = [name for name, models in LLM_TYPES.items() if language_model in models]
        raise ConfigError(
            f"--llm_type {llm_type} names a {' / '.join(LLM_TYPES[llm_type])} language model, but this family "
            f"{family} model has a {language_model} one; "
            + (f"pass --llm_type {' or '.join(fitting)} or " if fitting else "")
            + "drop --llm_type (the family is read from config.json)"
        )


__all__ = [
    "ConfigError", "DataArguments", "FinetuneTrainingArguments", "ModelArguments", "TuningArguments",
    "check_llm_type", "parse_args", "validate_args",
]
