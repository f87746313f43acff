"""SigLIP-so400m NaViT vision encoder of MiniCPM-Llama3-V 2.5 and MiniCPM-V 2.6 (spec §1.2).

Module names equal the checkpoints' `vpm.*` keys, which are those of transformers' Idefics2 vision
transformer; the encoder layers are transformers' own. What differs between the two families is
how patch position ids are computed, and that is the whole of this file.

Inputs arrive in the strip layout of the batch contract (docs/architecture.md): each slice is a
1-patch-tall strip [3, P, L*P] whose patches are the slice's patches in row-major order.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import Idefics2VisionConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder

PositionScheme = Literal["strip", "tgt_sizes"]


def _bucket_ids(count: int, boundaries: torch.Tensor) -> torch.Tensor:
    # The released code builds fractional coordinates with a float arange, not k / count; keep it,
    # since the two differ in the last bit for some counts and that moves bucket edges.
    fractions = torch.arange(0, 1 - 1e-6, 1 / count, device=boundaries.device)
    return torch.bucketize(fractions, boundaries, right=True)


class NaViTEmbeddings(nn.Module):
    """Patch embedding plus learned positions from a `side x side` table (side = image_size / patch)."""

    def __init__(self, config: Idefics2VisionConfig, position_scheme: PositionScheme) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.position_scheme = position_scheme
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def position_ids(self, tgt_sizes: torch.Tensor, length: int) -> torch.Tensor:
        """Position ids [B, length] for slices of tgt_sizes (h, w) patches, padded with 0."""
        side = self.num_patches_per_side
        device = self.position_embedding.weight.device
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
        ids = torch.zeros(len(tgt_sizes), length, dtype=torch.long, device=device)
        if self.position_scheme == "strip":
            # 2.5 quirk: its encoder is called without tgt_sizes on a 1-patch-tall strip with a mask
            # that is True on the whole row, so every slice gets row 0 of the table with columns
            # bucketed over the batch's longest strip, whatever its own (h, w).
            ids[:] = _bucket_ids(length, boundaries)
            return ids
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            grid = _bucket_ids(h, boundaries)[:, None] * side + _bucket_ids(w, boundaries)[None, :]
            ids[i, : h * w] = grid.flatten()
        return ids

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, P, L*P] strips -> embeddings [B, L, hidden]."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding(self.position_ids(tgt_sizes, patches.shape[1]))


class NaViTVisionTransformer(nn.Module):
    """`vpm` of 2.5 and 2.6: embeddings, transformers' Idefics2 encoder layers, post layer norm."""

    def __init__(self, config: Idefics2VisionConfig, position_scheme: PositionScheme) -> None:
        super().__init__()
        self.config = config
        self.embeddings = NaViTEmbeddings(config, position_scheme)
        self.encoder = Idefics2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Encodes a batch of strips.

        Args:
            pixel_values: [B, 3, P, L*P] strips, slice i valid in its first h_i * w_i patches.
            tgt_sizes: long [B, 2], (h, w) of each slice in patches.

        Returns:
            [B, L, hidden] patch features.
        """
        hidden = self.embeddings(pixel_values, tgt_sizes)
        mask = None
        if self.embeddings.position_scheme == "tgt_sizes":
            # 2.6 masks padded patches; 2.5's mask covers the whole strip (see position_ids), so
            # its padded patches are attended to, and its features depend on the batch.
            counts = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(hidden.device)
            valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < counts[:, None]
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=valid)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self.post_layernorm(hidden)


__all__ = ["NaViTVisionTransformer"]
