"""MiniCPM-V 2.6: SigLIP NaViT with tgt_sizes positions (`vpm`), the resampler, Qwen2-7B (`llm`)."""

from __future__ import annotations

from transformers import Idefics2VisionConfig, Qwen2Config, Qwen2ForCausalLM

from .minicpmv import MiniCPMV
from .navit import NaViTVisionTransformer


class MiniCPMV26(MiniCPMV):
    _no_split_modules = ["Qwen2DecoderLayer", "Idefics2EncoderLayer", "Resampler"]

    def build_llm(self, text_config: Qwen2Config) -> Qwen2ForCausalLM:
        return Qwen2ForCausalLM(text_config)

    def build_vision(self, vision_config: Idefics2VisionConfig) -> NaViTVisionTransformer:
        return NaViTVisionTransformer(vision_config, position_scheme="tgt_sizes")


__all__ = ["MiniCPMV26"]
