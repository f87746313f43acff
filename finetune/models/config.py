"""The MiniCPM-V configuration and the family detection that replaces the reference recipe's LLM_TYPE.

The released checkpoints flatten the language model's fields into the top level of config.json
(`MiniCPMVConfig` subclasses `MiniCPMConfig`, `LlamaConfig` or `Qwen2Config` upstream). We keep that
layout byte for byte, so a saved or merged model stays loadable by the hub code, and derive the
sub-configs (language model, vision encoder) from it.
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import Idefics2VisionConfig, LlamaConfig, PretrainedConfig, Qwen2Config

Family = Literal["2.0", "2.5", "2.6"]
FAMILIES: tuple[Family, ...] = ("2.0", "2.5", "2.6")
# Families loaded through transformers' own classes (models/hf_native.py), by config.json model_type.
NativeFamily = Literal["llava", "4.6"]
HF_NATIVE_FAMILIES: dict[str, NativeFamily] = {"llava": "llava", "minicpmv4_6": "4.6"}

# Top-level keys that describe the multimodal wrapper, not the language model.
_MULTIMODAL_KEYS = frozenset(
    {
        "version", "query_num", "image_size", "patch_size", "drop_vision_last_layer", "vision_config",
        "vision_encoder", "slice_config", "slice_mode", "max_slice_nums", "scale_resolution",
        "batch_vision_input", "mm_use_im_start_end", "use_image_id", "vision_batch_size", "auto_map",
        "architectures", "model_type", "family",
    }
)

# MiniCPM-V 2.0 names its timm vision encoder instead of describing it; these are the dimensions of
# `vit_so400m_patch14_siglip_384` (timm 0.9.10), the only encoder it ships with.
SO400M_384 = {
    "hidden_size": 1152,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "layer_norm_eps": 1e-6,
}


class UnsupportedModelError(ValueError):
    """config.json describes no model family this toolkit implements."""


def detect_family(config: dict[str, Any]) -> Family | NativeFamily:
    """Tells the model family from a config.json dict, so users never set LLM_TYPE by hand.

    MiniCPM-V 2.x (`model_type` minicpmv): 2.5 and 2.6 carry a `version` field (a string in 2.5's
    config, a number in 2.6's); 2.0 has none but is the only family with MiniCPM's muP scalings
    (`scale_emb`) and a timm vision encoder. model_type `llava` and `minicpmv4_6` are the families
    "llava" and "4.6", which load through transformers' own classes (`models/hf_native.py`).

    Raises:
        UnsupportedModelError: for other model types or versions, naming what was found.
    """
    model_type = config.get("model_type")
    if model_type in HF_NATIVE_FAMILIES:
        return HF_NATIVE_FAMILIES[model_type]
    if model_type != "minicpmv":
        raise UnsupportedModelError(
            f'config.json has model_type "{model_type}"; this toolkit reads MiniCPM-V 2.x checkpoints '
            '(model_type "minicpmv"), LLaVA ("llava") and MiniCPM-V 4.6 ("minicpmv4_6")'
        )
    version = config.get("version")
    if version is not None:
        normalized = f"{float(version):.1f}"
        if normalized in ("2.5", "2.6"):
            return normalized  # type: ignore[return-value]
        raise UnsupportedModelError(
            f"config.json has version {version!r}; supported MiniCPM-V versions are 2.0, 2.5 and 2.6"
        )
    if "scale_emb" in config or str(config.get("vision_encoder", "")).startswith("vit_so400m"):
        return "2.0"
    raise UnsupportedModelError(
        "config.json has model_type minicpmv but neither a version field nor MiniCPM-2.0's scale_emb; "
        "cannot tell which MiniCPM-V family it is"
    )


class MiniCPMVConfig(PretrainedConfig):
    """config.json of a MiniCPM-V 2.x checkpoint, in the released (flattened) layout.

    Every field of the file is kept as an attribute and written back unchanged by `save_pretrained`.
    `family` is derived, never stored.
    """

    model_type = "minicpmv"

    def __init__(self, query_num: int = 64, drop_vision_last_layer: bool = True, **kwargs: Any) -> None:
        # The released modeling code defaults drop_vision_last_layer to True; 2.5/2.6 configs set it
        # to false explicitly. Keeping the default means a config without the key builds what the
        # hub code builds.
        self.query_num = query_num
        self.drop_vision_last_layer = drop_vision_last_layer
        super().__init__(**kwargs)
        if self.query_num <= 0:
            raise ValueError(f"query_num must be positive, got {self.query_num}")

    @property
    def family(self) -> Family:
        return detect_family(self.to_dict())

    def llm_config(self) -> PretrainedConfig:
        """The language model's config, built from the flattened top-level fields."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _MULTIMODAL_KEYS}
        for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            fields.pop(key, None)
        if fields.get("rope_scaling") is None:
            fields.pop("rope_scaling", None)  # an explicit null only triggers a deprecation warning
        config_class = Qwen2Config if self.family == "2.6" else LlamaConfig
        text_config = config_class(**fields)
        text_config._attn_implementation = self._attn_implementation
        return text_config

    def vpm_config(self) -> Idefics2VisionConfig:
        """The vision encoder's dimensions (Idefics2VisionConfig is used as a plain container for 2.0).

        The number of layers already accounts for `drop_vision_last_layer`.
        """
        described = dict(self.to_dict().get("vision_config") or {})
        base = dict(SO400M_384) if self.family == "2.0" else {"image_size": 980, "layer_norm_eps": 1e-6}
        base.update({k: v for k, v in described.items() if k != "model_type"})
        if self.drop_vision_last_layer:
            base["num_hidden_layers"] -= 1
        vision_config = Idefics2VisionConfig(hidden_act="gelu_pytorch_tanh", **base)
        vision_config._attn_implementation = self._attn_implementation
        return vision_config


__all__ = [
    "FAMILIES", "Family", "HF_NATIVE_FAMILIES", "MiniCPMVConfig", "NativeFamily", "UnsupportedModelError",
    "detect_family",
]
