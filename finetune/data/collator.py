"""Batches of encoded samples in the batch contract (docs/architecture.md), and a length-grouped sampler."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .images import to_patch_strips
from .templates import IGNORE_INDEX


def pad_text(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` and `labels` of the samples: input_ids, attention_mask, labels [B, T]."""
    batch, longest = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.as_tensor(sample["input_ids"])
        labels[row, :length] = torch.as_tensor(sample["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MiniCPMVCollator:
    """Pads text and packs every slice of the batch into one pixel tensor.

    Input samples (from `ConversationDataset`): `input_ids` and `labels` long [T_i], `slices` a list
    of uint8 [H, W, 3] tensors (images in text order, each: source then grid cells row by row), and
    `image_spans` long [n_i], the start of each slice's placeholder tokens.

    Output (B samples, T the longest, S slices in all, L the most patches of any slice, P the patch):
        input_ids long [B, T], pad-filled on the right; attention_mask long [B, T];
        position_ids long [B, T]; labels long [B, T], -100 on padding;
        pixel_values uint8 [S, P, L*P, 3]; tgt_sizes long [S, 2]; image_bound long [S, 3]
        (sample, start, end); slice_counts long [B].
    """

    def __init__(self, pad_token_id: int, query_num: int, patch_size: int = 14) -> None:
        self.pad_token_id = pad_token_id
        self.query_num = query_num
        self.patch_size = patch_size

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        text = pad_text(samples, self.pad_token_id)
        # arange per sample, 0 on padding
        position_ids = (text["attention_mask"].cumsum(1) - 1).clamp(min=0) * text["attention_mask"]
        bounds, slices, counts = [], [], []
        for row, sample in enumerate(samples):
            starts = torch.as_tensor(sample["image_spans"], dtype=torch.long).reshape(-1)
            bounds.append(torch.stack([torch.full_like(starts, row), starts, starts + self.query_num], dim=1))
            slices.extend(sample["slices"])
            counts.append(len(sample["slices"]))
        pixel_values, tgt_sizes = to_patch_strips(slices, self.patch_size)
        return {
            **text,
            "position_ids": position_ids,
            "pixel_values": pixel_values,
            "tgt_sizes": tgt_sizes,
            "image_bound": torch.cat(bounds).reshape(-1, 3),
            "slice_counts": torch.tensor(counts, dtype=torch.long),
        }


class LengthGroupedSampler(Sampler[int]):
    """Shuffles samples, then sorts each window of `batch_size * group_windows` by length, longest first.

    Batches then hold samples of similar length, so padding stays small, while the order is still
    random. The order is a function of (seed, epoch) only, so a resumed run replays the same order
    (the Trainer calls `set_epoch`).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_windows: int = 50) -> None:
        self.lengths = lengths
        self.window = max(1, batch_size * group_windows)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for begin in range(0, len(order), self.window):
            window = order[begin : begin + self.window]
            yield from sorted(window, key=lambda index: -self.lengths[index])


__all__ = ["LengthGroupedSampler", "MiniCPMVCollator", "pad_text"]
