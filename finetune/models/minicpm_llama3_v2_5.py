"""MiniCPM-Llama3-V 2.5: SigLIP NaViT (`vpm`), the 2-D sin-cos resampler, Llama-3-8B (`llm`)."""

from __future__ import annotations

from transformers import Idefics2VisionConfig, LlamaConfig, LlamaForCausalLM

from .minicpmv import MiniCPMV
from .navit import NaViTVisionTransformer


class MiniCPMLlama3V25(MiniCPMV):
    _no_split_modules = ["LlamaDecoderLayer", "Idefics2EncoderLayer", "Resampler"]

    def build_llm(self, text_config: LlamaConfig) -> LlamaForCausalLM:
        return LlamaForCausalLM(text_config)

    def build_vision(self, vision_config: Idefics2VisionConfig) -> NaViTVisionTransformer:
        # 2.5 feeds its encoder 1-patch-tall strips without tgt_sizes: see NaViTEmbeddings.position_ids.
        return NaViTVisionTransformer(vision_config, position_scheme="strip")


__all__ = ["MiniCPMLlama3V25"]
