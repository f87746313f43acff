"""What is trained, part by part: LoRA on the language model (peft), or full training of parts."""

from __future__ import annotations

import logging

from peft import LoraConfig, get_peft_model
from torch import nn

from ..models import hf_native
from ..models.minicpmv import MiniCPMV
from ..models.tokenizer import SpecialTokens
from .args import DEFAULT_LORA_TARGETS, VISION_LORA_TARGETS, TuningArguments

logger = logging.getLogger(__name__)

# Module paths of what --tune_vision, --tune_resampler and --tune_llm train in the native 2.x models;
# transformers' classes have theirs in `hf_native.PARTS`.
PARTS = {"vision": ("vpm",), "resampler": ("resampler",), "llm": ("llm",)}


def model_parts(model: nn.Module) -> tuple[dict[str, tuple[str, ...]], str, str]:
    """The model's part map and its default LoRA targets (language model, vision encoder)."""
    family = hf_native.native_family(model)
    if family is None:
        return PARTS, DEFAULT_LORA_TARGETS, VISION_LORA_TARGETS
    return hf_native.PARTS[family], hf_native.LORA_TARGETS, hf_native.VISION_LORA_TARGETS


def _lora_targets(tuning: TuningArguments, llm_targets: str = DEFAULT_LORA_TARGETS,
                  vision_targets: str = VISION_LORA_TARGETS) -> str | list[str]:
    targets = tuning.lora_target_modules
    if "," in targets or targets.isidentifier():
        names = [name.strip() for name in targets.split(",") if name.strip()]
        return names
    if targets == DEFAULT_LORA_TARGETS:  # the flag's default names the 2.x modules
        targets = llm_targets
    if tuning.lora_on_vision:
        targets = f"({targets})|({vision_targets})"
    return targets


def added_token_ids(tokens: SpecialTokens) -> list[int]:
    """Rows of the embedding matrix that `--tune_embeddings new_tokens` trains."""
    ids = [tokens.image_start, tokens.image_end, tokens.slice_start, tokens.slice_end, tokens.unk,
           tokens.image_id_start, tokens.image_id_end]
    return sorted({i for i in ids if i is not None})


def apply_tuning(model: MiniCPMV, tuning: TuningArguments, tokens: SpecialTokens) -> nn.Module:
    """Freezes the model, then unfreezes (or wraps with LoRA) what `tuning` asks for.

    Returns:
        The model to train: `model` itself, or a peft `PeftModel` around it with `--use_lora`.
    """
    model.requires_grad_(False)
    parts, llm_targets, vision_targets = model_parts(model)
    full_parts = {"vision": tuning.tune_vision, "resampler": tuning.tune_resampler, "llm": tuning.tune_llm}
    if tuning.use_lora:
        modules_to_save = [path for name, on in full_parts.items() if on and name != "llm" for path in parts[name]]
        if tuning.tune_embeddings == "full":
            modules_to_save.append("embed_tokens")
        config = LoraConfig(
            r=tuning.lora_r,
            lora_alpha=tuning.lora_alpha,
            lora_dropout=tuning.lora_dropout,
            target_modules=_lora_targets(tuning, llm_targets, vision_targets),
            modules_to_save=modules_to_save or None,
            # peft trains just these rows and saves them with the adapter.
            trainable_token_indices={"embed_tokens": added_token_ids(tokens)}
            if tuning.tune_embeddings == "new_tokens"
            else None,
        )
        model = get_peft_model(model, config)
    else:
        for name, on in full_parts.items():
            if on:
                for path in parts[name]:
                    model.get_submodule(path).requires_grad_(True)
        if tuning.tune_embeddings == "full":
            model.get_input_embeddings().requires_grad_(True)
    for name, parameter in model.named_parameters():
        # 2.0's fixed query position table is a checkpoint parameter that is never trained.
        if name.endswith("pos_embed") and "resampler" in name:
            parameter.requires_grad_(False)
    return model


def trainable_summary(model: nn.Module) -> str:
    """'trainable: N of M parameters (p%)' plus a line per top-level part."""
    parts, _, _ = model_parts(model)
    per_part: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        # Under peft, names gain a prefix and wrapper levels; the part's path is still in them.
        part = next((f"{part} ({', '.join(paths)})" for part, paths in parts.items()
                     if any(f".{path}." in f".{name}" for path in paths)), "other")
        counts = per_part.setdefault(part, [0, 0])
        counts[1] += parameter.numel()
        if parameter.requires_grad:
            counts[0] += parameter.numel()
    trained = sum(c[0] for c in per_part.values())
    total = sum(c[1] for c in per_part.values())
    lines = [f"trainable: {trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.2f}%)"]
    lines += [f"  {part}: {c[0]:,} of {c[1]:,}" for part, c in sorted(per_part.items())]
    return "\n".join(lines)


__all__ = ["PARTS", "added_token_ids", "apply_tuning", "model_parts", "trainable_summary"]
