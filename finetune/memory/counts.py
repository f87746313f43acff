"""Exact parameter counts and layer sizes of a model, read from the model built on "meta".

`count_model` is the estimator's only use of torch: it builds the model `load_model` would load (our
native MiniCPM-V 2.x classes, or transformers' class for llava and 4.6) on the meta device
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
    norm), lm_head, vpm (vision encoder; llava's vision tower, 4.6's with its window merger),
    resampler (llava's projector, 4.6's merger). Dimensions are the language model's and the
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
    query_num: int  # image tokens per slice (llava: per image)
    scale_resolution: int  # side of a slice in pixels (llava: of the resized image)
    slicing: bool = True  # False: each image is one slice, whatever --max_slice_nums says (llava)
    llm_prefix: str = "llm."  # module-name prefix of the language model
    lora_defaults: tuple[str, str] | None = None  # the family's default LoRA targets (LLM, vision), if not 2.x's
    # The class's forward applies lm_head at every position before the loss (4.6's has no logits_to_keep);
    # those compute-dtype logits are dropped before the loss's chunks run (models/hf_native.py).
    forward_logits: bool = False
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
        UnsupportedModelError: a config of no family `load_model` reads.
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

    from ..models import hf_native
    from ..models.loading import build_model
    from ..train.trainable import model_parts

    model = build_model(config if config is not None else key, device="meta")
    # The part map the training flags use (train/trainable.py, models/hf_native.py); the input and
    # output embeddings are found by identity, so a tied lm_head is counted once, as peft counts it.
    paths, llm_lora, vision_lora = model_parts(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    ours = {"llm": "llm_layers", "vision": "vpm", "resampler": "resampler"}
    parts = dict.fromkeys(PARTS, 0)
    largest = dict.fromkeys(PARTS, 0)
    sizes = []
    never_trained = 0
    for name, parameter in model.named_parameters():
        if name.startswith("resampler.") and name.endswith("pos_embed"):
            never_trained += parameter.numel()  # 2.0's fixed query position table
        if parameter is embed:
            part = "embed_tokens"
        elif parameter is head:
            part = "lm_head"
        else:
            part = next(ours[p] for p, prefixes in paths.items() if any(name.startswith(f"{x}.") for x in prefixes))
        parts[part] += parameter.numel()
        largest[part] = max(largest[part], parameter.numel())
        sizes.append(parameter.numel())
    linears = tuple(
        LinearShape(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    )
    family = hf_native.native_family(model)
    if family is None:
        text, vision = model.config.llm_config(), model.config.vpm_config()
        images = _minicpmv_images(model.config)
    else:
        text, vision = model.config.text_config, model.config.vision_config
        images = _native_images(model, family, _image_processor_settings(None if config is not None else key))
    return ModelCounts(
        family=family or model.config.family,
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
        **images,
        llm_prefix=f"{paths['llm'][0]}.",
        lora_defaults=None if family is None else (llm_lora, vision_lora),
        forward_logits=family == "4.6",
        linears=linears,
        tensor_sizes=tuple(sorted(sizes)),
    )


def _minicpmv_images(config) -> dict[str, Any]:
    """MiniCPM-V 2.x: query_num resampler queries per slice, slices of scale_resolution pixels."""
    slice_config = getattr(config, "slice_config", None) or {}
    scale = getattr(config, "scale_resolution", None) or (
        slice_config.get("scale_resolution") if isinstance(slice_config, dict) else None
    ) or 448
    return {"patch_size": getattr(config, "patch_size", None) or config.vpm_config().patch_size,
            "query_num": config.query_num, "scale_resolution": int(scale), "slicing": True}


def _native_images(model, family: str, processor: dict) -> dict[str, Any]:
    """Image geometry of the transformers-native families, as their processors lay images out.

    llava: every image is resized to the vision tower's `image_size` and becomes one token per
    vision position (SigLIP: one per patch; CLIP: also its CLS), less one with the "default"
    feature strategy, which drops the first (LlavaProcessor's count); no slicing.
    4.6: slices of the processor's `scale_resolution` (config.json's `image_size` without a
    processor file), each patches / 16 tokens (/ 4 with `downsample_mode` "4x"), as
    MiniCPMV4_6Processor's `image_token_divisor`.
    """
    config = model.config
    patch = config.vision_config.patch_size
    if family == "llava":
        side = config.vision_config.image_size
        positions = model.model.vision_tower.embeddings.num_positions
        dropped = 1 if config.vision_feature_select_strategy == "default" else 0
        return {"patch_size": patch, "query_num": positions - dropped, "scale_resolution": side, "slicing": False}
    side = int(processor.get("scale_resolution") or config.image_size)
    divisor = 4 if processor.get("downsample_mode", config.downsample_mode) == "4x" else 16
    return {"patch_size": patch, "query_num": (side // patch) ** 2 // divisor, "scale_resolution": side,
            "slicing": bool(processor.get("slice_mode", True))}


def _image_processor_settings(directory: str | None) -> dict:
    """The image processor's settings in a model directory: preprocessor_config.json, or the
    `image_processor` entry of processor_config.json (where transformers 5 saves them); {} if none."""
    if directory is None:
        return {}
    folder = Path(directory)
    if (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text())
    if (folder / "processor_config.json").is_file():
        return json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    return {}


__all__ = ["PARTS", "LinearShape", "ModelCounts", "count_model"]
