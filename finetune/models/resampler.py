"""The one-layer perceiver resampler shared by MiniCPM-V 2.0, 2.5 and 2.6 (spec §1.3).

Parameter names equal the checkpoints' (`query`, `kv_proj`, `attn.in_proj_weight`, `attn.out_proj`,
`ln_q`, `ln_kv`, `ln_post`, `proj`, and 2.0's `pos_embed`). Every weight is read inside the forward
of the module that owns it, so DeepSpeed ZeRO-3 gathers it (stock nn.MultiheadAttention reads
`out_proj.weight` without calling `out_proj`, which breaks ZeRO-3: OpenBMB/MiniCPM-V#563).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The released 2.5/2.6 resamplers cache a 70 x 70 sin-cos table (980 px / 14) and regrow it on demand.
DEFAULT_POS_CACHE_SIDE = 70


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-style 1-D sin-cos codes: [sin(p * w_k) for all k, then cos(p * w_k)], w_k = 10000^(-k/(d/2)).

    Computed in float32 numpy like the released code, so bf16/fp16 casts quantise identically.
    """
    omega = np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, height: int, width: int) -> np.ndarray:
    """2-D sin-cos table of shape [height, width, embed_dim].

    Quirk kept from the released code: the meshgrid lists the width axis first, so the first half
    of each code encodes the column and the second half the row (its comments claim the opposite).
    """
    grid_w, grid_h = np.meshgrid(
        np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32), indexing="xy"
    )
    first_half = sincos_1d(embed_dim // 2, grid_w)  # column index
    second_half = sincos_1d(embed_dim // 2, grid_h)  # row index
    return np.concatenate([first_half, second_half], axis=1).reshape(height, width, embed_dim)


class ResamplerAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (packed q/k/v rows).

    Sequence-first like nn.MultiheadAttention. `out_proj` is called as a module (ZeRO-3, see above).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """query [Q, B, D], key/value [L, B, D], key_padding_mask [B, L] (True = ignore) -> [Q, B, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [N, B, D] -> [B, H, N, D/H]
            return x.view(x.shape[0], x.shape[1], heads, -1).permute(1, 2, 0, 3)

        q = split_heads(F.linear(query, w_q, b_q))
        k = split_heads(F.linear(key, w_k, b_k))
        v = split_heads(F.linear(value, w_v, b_v))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self.out_proj(out)


class Resampler(nn.Module):
    """Compresses each slice's patch features to `num_queries` tokens of the language model's width.

    `fixed_query_pos=True` is MiniCPM-V 2.0's variant: queries get a fixed 8x8 sin-cos table stored in
    the checkpoint (`pos_embed`), and keys a table computed for each image's patch grid. Otherwise
    (2.5/2.6) only keys get positions, from a non-persistent cached 2-D table.
    """

    def __init__(
        self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, *, fixed_query_pos: bool
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.fixed_query_pos = fixed_query_pos
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        # Applied as `x @ proj` (input dimension first), not as a transposed Linear weight.
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        if fixed_query_pos:
            side = int(math.isqrt(num_queries))
            # A checkpoint parameter that is never trained (requires_grad=False upstream).
            self.pos_embed = nn.Parameter(self.query_pos_table(side), requires_grad=False)
        else:
            # Not in the checkpoint: a cache rebuilt at init and grown when a slice is larger.
            self.register_buffer("pos_embed", self.key_pos_table(DEFAULT_POS_CACHE_SIDE), persistent=False)

    # as_tensor, not from_numpy: it honours a `with torch.device(...)` context, so a model built on
    # "meta" (or straight on the GPU) gets its tables there too instead of on the CPU.
    def query_pos_table(self, side: int) -> torch.Tensor:
        return torch.as_tensor(sincos_2d(self.embed_dim, side, side).reshape(side * side, -1))

    def key_pos_table(self, side: int) -> torch.Tensor:
        return torch.as_tensor(sincos_2d(self.embed_dim, side, side))

    def key_positions(self, tgt_sizes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Key position codes [B, length, D] for slices of (h, w) patches, zero past h*w."""
        device = self.query.device
        if self.fixed_query_pos:
            tables = [torch.from_numpy(sincos_2d(self.embed_dim, int(h), int(w))) for h, w in tgt_sizes.tolist()]
        else:
            need = int(tgt_sizes.max())
            if need > self.pos_embed.shape[0] or self.pos_embed.device != device:
                side = max(need, self.pos_embed.shape[0])
                self.pos_embed = self.key_pos_table(side).to(device)
            tables = [self.pos_embed[:h, :w] for h, w in tgt_sizes.tolist()]
        codes = torch.zeros(len(tables), length, self.embed_dim, device=device, dtype=dtype)
        for i, table in enumerate(tables):
            flat = table.reshape(-1, self.embed_dim)
            codes[i, : flat.shape[0]] = flat.to(device=device, dtype=dtype)
        return codes

    # Set by transformers' gradient_checkpointing_enable() like its layers' flag. The resampler's saved
    # tensors (~11 bytes per patch and output width) would otherwise wait through the whole language
    # model; checkpointed, only its input waits and the rest is recomputed in the backward.
    gradient_checkpointing = False

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Resamples patch features (recomputed in the backward under gradient checkpointing).

        Args:
            x: [B, L, kv_dim] patch features, slice i valid in its first h_i * w_i rows.
            tgt_sizes: long [B, 2], (h, w) of each slice in patches.

        Returns:
            [B, num_queries, embed_dim].
        """
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant whatever the Trainer's setting: with the vision encoder frozen, x needs no
            # grad, and reentrant checkpointing would then give the resampler's weights none.
            return checkpoint(self._resample, x, tgt_sizes, use_reentrant=False)
        return self._resample(x, tgt_sizes)

    def _resample(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        patch_counts = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        key_padding_mask = torch.arange(length, device=x.device)[None, :] >= patch_counts.to(x.device)[:, None]

        kv = self.ln_kv(self.kv_proj(x))
        keys = kv + self.key_positions(tgt_sizes, length, kv.dtype)
        queries = self.ln_q(self.query)
        if self.fixed_query_pos:
            queries = queries + self.pos_embed.to(queries.dtype)
        queries = queries[:, None, :].expand(-1, batch, -1)

        out = self.attn(queries, keys.transpose(0, 1), kv.transpose(0, 1), key_padding_mask)
        out = self.ln_post(out.transpose(0, 1))
        return out @ self.proj


__all__ = ["Resampler", "sincos_1d", "sincos_2d"]
