"""MiniCPM-V 2.0: timm SigLIP ViT (`vpm`), the fixed-query resampler, MiniCPM-2.4B (`llm`).

MiniCPM-2.4B is Llama-shaped (RMSNorm, SwiGLU, RoPE, the same key names) with muP scalings:
each residual branch times scale_depth / sqrt(num_layers), the final hidden state divided by
hidden_size / dim_model_base before lm_head, and token embeddings times scale_emb (applied by
`MiniCPMV.embed_inputs`, since the wrapper always passes inputs_embeds). transformers ships no class
for it, so it is written here on top of transformers' Llama modules.

The vision encoder keeps timm 0.9.10's `vit_so400m_patch14_siglip_384` parameter names
(`patch_embed.proj`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`) without depending on timm; the last block is dropped (`drop_vision_last_layer`).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Idefics2VisionConfig, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .minicpmv import MiniCPMV

# ---------------------------------------------------------------------------------------------------
# Language model: MiniCPM-2.4B


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose two residual branches are scaled by scale_depth / sqrt(L)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + attended * self.residual_scale
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + mlp_out * self.residual_scale


class MiniCPMFinalNorm(LlamaRMSNorm):
    """The final RMSNorm, followed by MiniCPM's division by hidden_size / dim_model_base.

    Upstream divides right before lm_head; doing it here is the same arithmetic and lets every
    caller of `llm.model` + `llm.lm_head` (generation, our selective-logits loss) get it for free.
    """

    def __init__(self, hidden_size: int, eps: float, logit_divisor: float) -> None:
        super().__init__(hidden_size, eps=eps)
        self.logit_divisor = logit_divisor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) / self.logit_divisor


class MiniCPMModel(LlamaModel):
    def __init__(self, config: LlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MiniCPMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MiniCPMFinalNorm(
            config.hidden_size, config.rms_norm_eps, config.hidden_size / config.dim_model_base
        )
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MiniCPMForCausalLM(LlamaForCausalLM):
    """MiniCPM-2.4B as driven by MiniCPM-V 2.0 (through inputs_embeds, already scaled by scale_emb)."""

    def __init__(self, config: LlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---------------------------------------------------------------------------------------------------
# Vision encoder: timm SigLIP so400m/14 at 384 px, timm parameter names


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(GradientCheckpointingLayer):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def resample_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """timm's resample_abs_pos_embed: bicubic, antialiased, in float32, no prefix tokens.

    [1, N*N, D] -> [height*width, D].
    """
    side = int(math.isqrt(pos_embed.shape[1]))
    if (height, width) == (side, side):
        return pos_embed[0]
    grid = pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(height * width, -1).to(pos_embed.dtype)


class SiglipViT(nn.Module):
    """`vpm` of MiniCPM-V 2.0: timm's forward_features with a dynamic image size, no pooling head.

    The released model encodes one image per call. Here all slices of a batch go through in one call,
    padded, with padded patches masked out of attention; every other operation is per patch, so each
    slice's features equal a call on it alone. One call per batch is also what ZeRO-3 needs: every
    rank must run the same sequence of module forwards, whatever sizes its images have (the released
    per-image loop is why 2.0 could not train under ZeRO-3, OpenBMB/MiniCPM-V#268).
    """

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        side = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, config.hidden_size)
        self.pos_embed = nn.Parameter(torch.empty(1, side * side, config.hidden_size))
        self.blocks = nn.ModuleList(
            Block(config.hidden_size, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Encodes a batch of strips.

        Args:
            pixel_values: [B, 3, P, L*P] strips (patches row-major, side by side; a kernel = stride
                = P convolution over a strip equals one over the image).
            tgt_sizes: long [B, 2], (h, w) of each slice in patches.

        Returns:
            [B, L, hidden] patch features (rows past h*w are padding).
        """
        x = self.patch_embed(pixel_values)
        positions = torch.zeros_like(x)
        sizes = tgt_sizes.tolist()
        for h, w in set(map(tuple, sizes)):
            rows = [i for i, size in enumerate(sizes) if tuple(size) == (h, w)]
            positions[rows, : h * w] = resample_pos_embed(self.pos_embed, h, w).to(x.dtype)
        x = x + positions
        counts = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        mask = None
        if bool((counts < x.shape[1]).any()):
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < counts.to(x.device)[:, None]
            mask = valid[:, None, None, :]  # [B, 1, 1, L]: every query attends to valid patches only
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class MiniCPMV2(MiniCPMV):
    _no_split_modules = ["MiniCPMDecoderLayer", "Block", "Resampler"]
    # 2.0's queries carry a fixed 8x8 sin-cos table (a checkpoint parameter).
    resampler_fixed_query_pos = True

    def build_llm(self, text_config: LlamaConfig) -> MiniCPMForCausalLM:
        return MiniCPMForCausalLM(text_config)

    def build_vision(self, vision_config: Idefics2VisionConfig) -> SiglipViT:
        return SiglipViT(vision_config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SiglipViT):
            init.trunc_normal_(module.pos_embed, std=0.02)


__all__ = ["MiniCPMForCausalLM", "MiniCPMV2", "SiglipViT"]
