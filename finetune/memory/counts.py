"""Exact parameter counts and layer sizes of a MiniCPM-V model, read from the model built on "meta".

`count_model` is the estimator's only use of torch: it builds the native model on the meta device
(no memory, about a second for an 8B model), counts every parameter per part and records each
Linear's shape, so LoRA sizes follow from the target regex and rank with no model at all. The
result is a plain dataclass; everything downstream of it is arithmetic.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Parts of the model, in the order the breakdown lists them.
PARTS = ("embed_tokens", "llm_layers", "lm_head", "vpm", "resampler")


@dataclass(frozen=True)
class LinearShape:
    name: str  # module name in the model, e.g. "llm.model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelCounts:
    """What the estimator needs to know about one model: parameter counts and dimensions.

    `parts` counts every parameter once: embed_tokens, llm_layers (decoder layers and the final
    norm), lm_head, vpm (vision encoder), resampler. Dimensions are the language model's and the
    vision encoder's as built.
    """

    family: str
    parts: dict[str, int]
    largest: dict[str, int]  # numel of each part's largest parameter tensor
    never_trained: int  # parameters apply_tuning always freezes (2.0's fixed resampler query table)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    query_num: int
    scale_resolution: int
    linears: tuple[LinearShape, ...] = field(repr=False, default=())
    tensor_sizes: tuple[int, ...] = field(repr=False, default=())  # numel of every parameter tensor

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (what ZeRO-3 gathers at a time)."""
        return self.parts["llm_layers"] // self.num_layers

    def params_at_most(self, numel: int) -> int:
        """Parameters held in tensors of at most `numel` elements (ZeRO-3 keeps these unpartitioned)."""
        return sum(s for s in self.tensor_sizes if s <= numel)

    def lora_parameters(self, targets: str | list[str], rank: int) -> int:
        """LoRA A and B sizes, r * (in + out) per targeted Linear, matched as peft matches.

        peft matches a string target with `re.fullmatch` against each module name and a list of
        names by equality or as a dotted suffix (peft `check_target_module_exists`).
        """
        if isinstance(targets, str):
            pattern = re.compile(targets)
            hits = [s for s in self.linears if pattern.fullmatch(s.name)]
        else:
            hits = [s for s in self.linears if any(s.name == t or s.name.endswith("." + t) for t in targets)]
        return sum(rank * (s.in_features + s.out_features) for s in hits)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("linears")
        data.pop("tensor_sizes")
        return data


def _config_key(model_config_or_dir: str | Path | dict) -> str:
    if isinstance(model_config_or_dir, dict):
        return json.dumps(model_config_or_dir, sort_keys=True, default=str)
    return str(Path(model_config_or_dir).resolve())


def count_model(model_config_or_dir: str | Path | dict | ModelCounts) -> ModelCounts:
    """Counts a model given its directory (config.json) or config dict; cached per config.

    Raises:
        CheckpointError: no config.json in the directory.
        UnsupportedModelError: not a MiniCPM-V 2.0 / 2.5 / 2.6 config.
    """
    if isinstance(model_config_or_dir, ModelCounts):
        return model_config_or_dir
    key = _config_key(model_config_or_dir)
    if key not in _CACHE:
        _CACHE[key] = _count(key, model_config_or_dir if isinstance(model_config_or_dir, dict) else None)
    return _CACHE[key]


_CACHE: dict[str, ModelCounts] = {}


def _count(key: str, config: dict | None) -> ModelCounts:
    from torch import nn

    from ..models.config import UnsupportedModelError
    from ..models.loading import build_model
    from ..models.minicpmv import MiniCPMV

    model = build_model(config if config is not None else key, device="meta")
    if not isinstance(model, MiniCPMV):
        raise UnsupportedModelError(
            f"{key if config is None else 'this config'}: memory estimates cover MiniCPM-V 2.0, 2.5 and 2.6; "
            f"got {type(model).__name__}"
        )
    parts = dict.fromkeys(PARTS, 0)
    largest = dict.fromkeys(PARTS, 0)
    sizes = []
    never_trained = 0
    for name, parameter in model.named_parameters():
        if name.startswith("resampler.") and name.endswith("pos_embed"):
            never_trained += parameter.numel()
        if name.startswith("llm.model.embed_tokens"):
            part = "embed_tokens"
        elif name.startswith("llm.lm_head"):
            part = "lm_head"
        elif name.startswith("llm."):
            part = "llm_layers"
        else:
            part = name.split(".")[0]
        parts[part] += parameter.numel()
        largest[part] = max(largest[part], parameter.numel())
        sizes.append(parameter.numel())
    linears = tuple(
        LinearShape(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    )
    text, vision = model.config.llm_config(), model.config.vpm_config()
    slice_config = getattr(model.config, "slice_config", None) or {}
    scale = getattr(model.config, "scale_resolution", None) or (
        slice_config.get("scale_resolution") if isinstance(slice_config, dict) else None
    ) or 448
    return ModelCounts(
        family=model.config.family,
        parts=parts,
        largest=largest,
        never_trained=never_trained,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab_size=text.vocab_size,
        vision_hidden_size=vision.hidden_size,
        vision_intermediate_size=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        patch_size=getattr(model.config, "patch_size", None) or vision.patch_size,
        query_num=model.config.query_num,
        scale_resolution=int(scale),
        linears=linears,
        tensor_sizes=tuple(sorted(sizes)),
    )


__all__ = ["PARTS", "LinearShape", "ModelCounts", "count_model"]
