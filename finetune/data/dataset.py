"""Canonical records to model samples: images sliced, conversation encoded, one sample per record.

`SampleEncoder` is the single place where a record becomes token ids, labels and slices; the
validation pass (`check.py`) and the training dataset both call it, so what check-data accepts is
exactly what training reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..models.config import HF_NATIVE_FAMILIES, Family
from ..models.tokenizer import SpecialTokens, load_tokenizer, special_token_ids
from .collator import MiniCPMVCollator
from .images import open_image, preprocess_image
from .slicing import plan_slices
from .templates import ChatEncoder, Encoded, ImageLayout


@dataclass(frozen=True)
class DataSettings:
    """What decides how a record is encoded (from the model's config and the data arguments)."""

    family: Family
    query_num: int
    max_slice_nums: int
    model_max_length: int
    truncate: bool = True  # False: refuse over-long samples instead of dropping exchanges
    scale_resolution: int = 448
    patch_size: int = 14


class SampleEncoder:
    """Encodes records for the native MiniCPM-V 2.x families (see `load_sample_encoder`)."""

    def __init__(self, settings: DataSettings, tokenizer, tokens: SpecialTokens) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.chat = ChatEncoder(settings.family, tokenizer, tokens, settings.query_num)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, settings: DataSettings) -> SampleEncoder:
        tokenizer = load_tokenizer(model_dir)
        return cls(settings, tokenizer, special_token_ids(tokenizer))

    def collator(self) -> MiniCPMVCollator:
        return MiniCPMVCollator(self.tokens.pad, self.settings.query_num, self.settings.patch_size)

    def layout(self, width: int, height: int) -> ImageLayout:
        s = self.settings
        plan = plan_slices(
            width, height, max_slice_nums=s.max_slice_nums, scale_resolution=s.scale_resolution,
            patch_size=s.patch_size,
        )
        return ImageLayout(plan.grid)

    def encode_text(self, record: dict, layouts: list[ImageLayout]) -> Encoded:
        """Token ids and labels (raises ConversationTooLongError / NothingToTrainError)."""
        s = self.settings
        return self.chat.encode(record["messages"], layouts, max_length=s.model_max_length, truncate=s.truncate)

    def _slice_images(self, images: list[Image.Image]) -> tuple[list[ImageLayout], list[list[torch.Tensor]]]:
        s = self.settings
        layouts: list[ImageLayout] = []
        per_image: list[list[torch.Tensor]] = []
        for image in images:
            plan, pieces = preprocess_image(
                image, max_slice_nums=s.max_slice_nums, scale_resolution=s.scale_resolution, patch_size=s.patch_size
            )
            layouts.append(ImageLayout(plan.grid))
            per_image.append(pieces)
        return layouts, per_image

    def encode(self, record: dict, images: list[Image.Image]) -> dict:
        """A training sample: `input_ids`, `labels`, `slices` (uint8 [H, W, 3] each), `image_spans`."""
        layouts, per_image = self._slice_images(images)
        encoded = self.encode_text(record, layouts)
        return self._sample(encoded, per_image)

    def encode_prompt(self, record: dict, images: list[Image.Image]) -> dict:
        """A generation prompt, sliced and placed as `encode` does, with the family's assistant header
        appended and every label -100. `record["messages"]` must end with a user turn; it is never
        truncated."""
        layouts, per_image = self._slice_images(images)
        return self._sample(self.chat.encode_prompt(record["messages"], layouts), per_image)

    @staticmethod
    def _sample(encoded: Encoded, per_image: list[list[torch.Tensor]]) -> dict:
        slices: list[torch.Tensor] = []
        for pieces in per_image[: encoded.num_images]:  # images of dropped exchanges go with them
            slices.extend(pieces)
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "slices": slices,
            "image_spans": torch.tensor(encoded.image_spans, dtype=torch.long),
        }


def load_sample_encoder(model_dir: str | Path, settings: DataSettings):
    """The record encoder for the model in `model_dir`: ours for 2.x, the processor's for llava / 4.6."""
    if settings.family in HF_NATIVE_FAMILIES.values():
        from .hf_native import NativeSampleEncoder  # imports this module

        return NativeSampleEncoder.from_pretrained(model_dir, settings)
    return SampleEncoder.from_pretrained(model_dir, settings)


class ConversationDataset(Dataset):
    """Map-style dataset over validated canonical records; images are decoded in `__getitem__`,
    that is, lazily in the dataloader workers."""

    def __init__(self, records, encoder: SampleEncoder, lengths: list[int]) -> None:
        self.records = records
        self.encoder = encoder
        self.lengths = lengths  # tokens per sample, images included, for length-grouped batching

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = [open_image(image["path"]) for image in record["images"]]
        return self.encoder.encode(record, images)


__all__ = ["ConversationDataset", "DataSettings", "SampleEncoder", "load_sample_encoder"]
