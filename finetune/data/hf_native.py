"""Samples for the transformers-native families (llava, 4.6): the model's processor places the images.

The conversation goes through `ChatEncoder`, so formats, validation, truncation (whole exchanges
from the end, images with them) and assistant-only, unshifted labels follow exactly the 2.x rules
and code. Only the image placeholder differs: it is the text the processor itself writes for an
image (`replace_image_token`: llava's run of `<image>` tokens, one per vision patch; 4.6's source
and slices with `<image_id>` tags), tokenized. Pixels come from the processor's image processor.

The chat format is read off the vocabulary: `<|eot_id|>` means Llama-3's (2.5's rules, BOS
first), `<|im_end|>` ChatML (2.6's rules); the tiny models' chat templates render the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.config import NativeFamily
from ..models.tokenizer import MissingSpecialTokenError, SpecialTokens
from .collator import pad_text
from .dataset import DataSettings
from .templates import ChatEncoder, Encoded

# End-of-turn token -> the ChatEncoder rules of that chat format; stop tokens of the format.
_CHAT_FORMATS = {
    "<|eot_id|>": ("2.5", ("<|end_of_text|>", "<|eot_id|>")),
    "<|im_end|>": ("2.6", ("<|im_end|>", "<|endoftext|>")),
}


@dataclass(frozen=True)
class ProcessorImageLayout:
    """One image as the processor lays it out: its placeholder text and how many slices it has
    (llava: 1; 4.6: the source plus the grid). 4.6's `<image_id>` tag is added per position."""

    text: str
    num_slices: int


class ProcessorChatEncoder(ChatEncoder):
    """`ChatEncoder` whose image placeholders are the processor's."""

    def __init__(self, chat_format: str, tokenizer, tokens: SpecialTokens, processor) -> None:
        super().__init__(chat_format, tokenizer, tokens, query_num=0)
        self.processor = processor
        self.use_image_id = bool(getattr(processor, "default_use_image_id", False))
        self._cache: dict[str, list[int]] = {}

    def image_placeholder(self, layout: ProcessorImageLayout, image_index: int) -> tuple[list[int], list[int]]:
        """Token ids of one image's placeholder; no spans (the model finds the image tokens itself)."""
        text = layout.text
        if self.use_image_id:  # as MiniCPMV4_6Processor._prepend_local_ids numbers them: per sample
            p = self.processor
            text = f"{p.image_id_start_token}{image_index}{p.image_id_end_token}{text}"
        if text not in self._cache:
            self._cache[text] = self._text(text)
        return list(self._cache[text]), []


def native_special_tokens(processor) -> tuple[str, SpecialTokens]:
    """The chat format ("2.5" Llama-3 or "2.6" ChatML rules) and the token ids the encoder needs.

    Image fields hold the processor's tokens; where a family has no such token (llava has no image
    or slice bounds) the field repeats the image token's id, so `added_token_ids` (the rows
    `--tune_embeddings new_tokens` trains) is exactly the set of image tokens.

    Raises:
        MissingSpecialTokenError: the vocabulary has neither chat format's end-of-turn token.
    """
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    eot = next((token for token in _CHAT_FORMATS if token in vocab), None)
    if eot is None:
        raise MissingSpecialTokenError(
            f"the tokenizer in {tokenizer.name_or_path} has neither <|eot_id|> (Llama-3) nor <|im_end|> (ChatML); "
            "only these chat formats are supported for llava and MiniCPM-V 4.6 models"
        )
    chat_format, stops = _CHAT_FORMATS[eot]
    image = processor.image_token_id

    def named(attribute: str) -> int:
        token = getattr(processor, attribute, None)
        return vocab[token] if token in vocab else image

    tokens = SpecialTokens(
        image_start=named("image_start_token"), image_end=named("image_end_token"),
        slice_start=named("slice_start_token"), slice_end=named("slice_end_token"), unk=image,
        image_id_start=vocab.get(getattr(processor, "image_id_start_token", None)),
        image_id_end=vocab.get(getattr(processor, "image_id_end_token", None)),
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stop_ids=tuple(vocab[token] for token in stops if token in vocab), eot_id=vocab[eot],
    )
    return chat_format, tokens


class NativeSampleEncoder:
    """`SampleEncoder`'s interface (used by check-data and the dataset) for llava and 4.6 models.

    Args:
        settings: `family` ("llava" or "4.6"), `max_slice_nums` (4.6), `model_max_length`, `truncate`.
        processor: the model directory's processor (`hf_native.load_processor`).
    """

    def __init__(self, settings: DataSettings, processor) -> None:
        self.settings = settings
        self.processor = processor
        self.tokenizer = processor.tokenizer
        chat_format, self.tokens = native_special_tokens(processor)
        self.chat = ProcessorChatEncoder(chat_format, self.tokenizer, self.tokens, processor)
        self._fixed_layout: ProcessorImageLayout | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, settings: DataSettings) -> NativeSampleEncoder:
        from ..models.hf_native import load_processor

        return cls(settings, load_processor(model_dir, settings.family))

    def collator(self) -> NativeCollator:
        return NativeCollator(self.tokens.pad, self.settings.family)

    # -- layouts ---------------------------------------------------------------------------------------

    def layout(self, width: int, height: int) -> ProcessorImageLayout:
        """The placeholder of a `width` x `height` image, from its size alone (no pixels decoded)."""
        if self.settings.family == "llava":
            # LLaVA image processors resize (and crop) every image to one size, so every image has
            # the same placeholder (LlavaProcessor._get_num_multimodal_tokens assumes so too).
            if self._fixed_layout is None:
                processed = self.processor.image_processor([Image.new("RGB", (64, 64))], return_tensors="np")
                self._fixed_layout = ProcessorImageLayout(self.processor.replace_image_token(processed, 0), 1)
            return self._fixed_layout
        return self._minicpmv4_6_layout(width, height)

    def _minicpmv4_6_layout(self, width: int, height: int) -> ProcessorImageLayout:
        # The geometry of MiniCPMV4_6ImageProcessor._preprocess, through its own methods; the
        # placeholder is then the processor's own `replace_image_token` on those sizes.
        ip = self.processor.image_processor
        size, patch, mode = (height, width), ip.patch_size, ip.downsample_mode
        grid = ip.get_sliced_grid(size, self.settings.max_slice_nums, ip.scale_resolution) if ip.slice_mode else None
        source = ip.find_best_resize(size, ip.scale_resolution, patch, downsample_mode=mode,
                                     allow_upscale=grid is None)
        sizes = [[source[0] // patch, source[1] // patch]]
        if grid is not None:
            refine = ip.get_refine_size(size, grid, ip.scale_resolution, patch, downsample_mode=mode,
                                        allow_upscale=True)
            piece = (refine[0] // grid[0] // patch, refine[1] // grid[1] // patch)
            sizes += [list(piece)] * (grid[0] * grid[1])
        inputs = {"grids": [grid or [0, 0]], "num_patches_per_image": [len(sizes)], "target_sizes": np.array(sizes)}
        text = self.processor.replace_image_token(inputs, 0, image_token_divisor=self.processor.image_token_divisor)
        return ProcessorImageLayout(text, len(sizes))

    # -- samples ---------------------------------------------------------------------------------------

    def encode_text(self, record: dict, layouts: list[ProcessorImageLayout]) -> Encoded:
        """Token ids and labels (raises ConversationTooLongError / NothingToTrainError)."""
        s = self.settings
        return self.chat.encode(record["messages"], layouts, max_length=s.model_max_length, truncate=s.truncate)

    def encode(self, record: dict, images: list[Image.Image]) -> dict:
        """A training sample: `input_ids`, `labels` (long [T]) and, with images, the processor's
        `pixel_values` (llava float [n, 3, H, W]; 4.6 float [3, P, L], the slices' patches side by
        side) and 4.6's `target_sizes` (int [s, 2], each slice's patch grid)."""
        processed, layouts = self._images(images)
        return self._sample(self.encode_text(record, layouts), processed, layouts)

    def encode_prompt(self, record: dict, images: list[Image.Image]) -> dict:
        """A generation prompt, as `encode` would place its images, with the chat format's assistant
        header appended and every label -100. `record["messages"]` must end with a user turn; it is
        never truncated."""
        processed, layouts = self._images(images)
        return self._sample(self.chat.encode_prompt(record["messages"], layouts), processed, layouts)

    def _images(self, images: list[Image.Image]) -> tuple[dict | None, list[ProcessorImageLayout]]:
        if not images:
            return None, []
        processed = self._process(images)
        return processed, self._layouts(processed, len(images))

    def _sample(self, encoded: Encoded, processed, layouts: list[ProcessorImageLayout]) -> dict:
        sample = {"input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                  "labels": torch.tensor(encoded.labels, dtype=torch.long)}
        if encoded.num_images:  # images of dropped exchanges go with them
            sample.update(self._keep_images(processed, layouts, encoded.num_images))
        return sample

    def _process(self, images: list[Image.Image]):
        if self.settings.family == "llava":
            return self.processor.image_processor(images, return_tensors="pt")
        return self.processor.image_processor(images, max_slice_nums=self.settings.max_slice_nums, return_tensors="pt")

    def _layouts(self, processed, count: int) -> list[ProcessorImageLayout]:
        if self.settings.family == "llava":
            return [ProcessorImageLayout(self.processor.replace_image_token(processed, i), 1) for i in range(count)]
        divisor = self.processor.image_token_divisor
        return [
            ProcessorImageLayout(self.processor.replace_image_token(processed, i, image_token_divisor=divisor),
                                 int(processed["num_patches_per_image"][i]))
            for i in range(count)
        ]

    def _keep_images(self, processed, layouts: list[ProcessorImageLayout], kept: int) -> dict:
        if self.settings.family == "llava":
            return {"pixel_values": processed["pixel_values"][:kept]}
        slices = sum(layout.num_slices for layout in layouts[:kept])
        target_sizes = processed["target_sizes"][:slices]
        columns = int(target_sizes.prod(-1).sum()) * self.processor.image_processor.patch_size
        return {"pixel_values": processed["pixel_values"][0, ..., :columns], "target_sizes": target_sizes}


class NativeCollator:
    """Pads text and batches pixels the way the model class takes them.

    Input samples: from `NativeSampleEncoder.encode`.

    Output (B samples, T the longest):
        input_ids long [B, T], pad-filled on the right; attention_mask long [B, T], 1 on real tokens;
        labels long [B, T], unshifted (the model shifts), -100 on padding and untrained tokens.
        llava, when the batch has N > 0 images: pixel_values float [N, 3, H, W], samples in order,
        each sample's images in text order.
        4.6, when the batch has S > 0 slices: pixel_values float [1, 3, P, sum of L] (every slice's
        patches side by side, as MiniCPMV4_6Processor packs a batch), target_sizes int32 [S, 2].
    Without images the pixel keys are absent. position_ids are left to the model: right padding
    makes its default positions the same, and models that place image tokens in multimodal rope
    positions compute those themselves.
    """

    def __init__(self, pad_token_id: int, family: NativeFamily) -> None:
        self.pad_token_id = pad_token_id
        self.family = family

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        out = pad_text(samples, self.pad_token_id)
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images and self.family == "llava":
            out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        elif with_images:
            out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images], dim=-1).unsqueeze(0)
            out["target_sizes"] = torch.cat([s["target_sizes"] for s in with_images]).to(torch.int32)
        return out


__all__ = [
    "NativeCollator",
    "NativeSampleEncoder",
    "ProcessorChatEncoder",
    "ProcessorImageLayout",
    "native_special_tokens",
]
