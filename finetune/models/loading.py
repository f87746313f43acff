"""One loading path for every MiniCPM-V family: the family comes from config.json, never from a flag."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import HF_NATIVE_FAMILIES, Family, MiniCPMVConfig, detect_family
from .minicpm_llama3_v2_5 import MiniCPMLlama3V25
from .minicpm_v2 import MiniCPMV2
from .minicpm_v2_6 import MiniCPMV26
from .minicpmv import MiniCPMV

MODEL_CLASSES: dict[Family, type[MiniCPMV]] = {"2.0": MiniCPMV2, "2.5": MiniCPMLlama3V25, "2.6": MiniCPMV26}


class CheckpointError(RuntimeError):
    """A model directory is incomplete or its weights do not fit the model its config describes."""


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; pass a directory in Hugging Face hub format")
    return json.loads(config_file.read_text())


def _native_family(path_or_config: str | Path | dict) -> str | None:
    family = detect_family(path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config))
    return family if family in HF_NATIVE_FAMILIES.values() else None


def _config_from(path_or_config: str | Path | dict | MiniCPMVConfig, attn_implementation: str) -> MiniCPMVConfig:
    if isinstance(path_or_config, MiniCPMVConfig):
        config = path_or_config
    else:
        raw = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
        detect_family(raw)  # fail with the family error before anything else
        # rope_scaling: null is the released files' way of saying "none"; passing it on only
        # triggers transformers' deprecation warning.
        fields = {k: v for k, v in raw.items() if k != "model_type" and not (k == "rope_scaling" and v is None)}
        config = MiniCPMVConfig(**fields)
    config._attn_implementation = attn_implementation
    return config


def build_model(
    path_or_config: str | Path | dict | MiniCPMVConfig,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> MiniCPMV:
    """Builds the native model a config describes, with random weights (or none, on "meta").

    The memory planner and tests build models on the meta device to count parameters for free.
    The transformers-native families (llava, 4.6) build their transformers class.
    """
    if not isinstance(path_or_config, MiniCPMVConfig) and _native_family(path_or_config):
        from .hf_native import build_hf_native

        return build_hf_native(path_or_config, device=device, dtype=dtype, attn_implementation=attn_implementation)
    config = _config_from(path_or_config, attn_implementation)
    with torch.device(device):
        model = MODEL_CLASSES[config.family](config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> MiniCPMV:
    """Loads a hub-format MiniCPM-V directory (config.json + safetensors) into the native model.

    A llava or minicpmv4_6 directory loads into its transformers class instead (`hf_native.py`).

    Args:
        path: the model directory.
        dtype: torch dtype (or its name) for the weights; default: the config's `torch_dtype`.
        attn_implementation: "sdpa" (default), "eager" or "flash_attention_2" where installed.

    Raises:
        CheckpointError: missing files, or weights whose names do not match the model exactly
            (both lists are shown), e.g. a checkpoint of another family or an unmerged adapter.
    """
    if family := _native_family(path):
        from .hf_native import load_hf_native

        return load_hf_native(path, family, dtype=dtype, attn_implementation=attn_implementation)
    config = _config_from(path, attn_implementation)
    if dtype is None:
        dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, info = MODEL_CLASSES[config.family].from_pretrained(
        path, config=config, dtype=dtype, output_loading_info=True
    )
    unexpected = [key for key in info["unexpected_keys"] if key != "resampler.pos_embed"]
    if info["missing_keys"] or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not match a MiniCPM-V {config.family} model; "
            f"missing: {sorted(info['missing_keys'])[:10]}, unexpected: {sorted(unexpected)[:10]}"
        )
    if model.resampler.fixed_query_pos:
        # transformers' loader re-creates every loaded parameter with requires_grad=True; 2.0's
        # query position table is a fixed sin-cos table that is never trained (spec §1.3).
        model.resampler.pos_embed.requires_grad_(False)
    return model


__all__ = ["CheckpointError", "MODEL_CLASSES", "build_model", "load_model", "read_config"]
