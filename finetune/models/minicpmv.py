"""The MiniCPM-V wrapper shared by every 2.x family: `llm`, `vpm` and `resampler` (spec §1.1, §2).

A family file (minicpm_v2.py, minicpm_llama3_v2_5.py, minicpm_v2_6.py) subclasses `MiniCPMV`, builds
the three parts and says how a batch of slices is encoded. Everything else lives here once: joining
image features into the text embeddings, the forward pass, and the loss.

The batch contract is in docs/architecture.md. Labels follow the transformers convention
(unshifted; this model shifts), unlike the reference recipe's pre-shifted labels (spec §2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MiniCPMVConfig
from .resampler import Resampler

IGNORE_INDEX = -100
# The resampler's attention heads are 128 wide in every released model (spec §1.3).
RESAMPLER_HEAD_DIM = 128
# The loss splits the supervised positions into this many chunks and recomputes each chunk's logits
# in the backward, so one chunk's fp32 logits exist at a time (the loss holds three copies; at a
# 128k vocabulary that is 1.5 MB per position). A fixed count, not a fixed size: every rank calls
# lm_head equally often, which ZeRO-3's parameter gathering needs.
LOSS_CHUNKS = 8
# What each uint8 pixel value becomes: the reference's float32 ToTensor (x / 255) then Normalize
# (mean = std = 0.5), computed once on the CPU. Looking values up, rather than dividing on the
# accelerator, keeps them bit-identical on every device (CUDA turns a division by a scalar into a
# multiplication by its reciprocal).
PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div(255).sub(0.5).div(0.5)


def normalize_pixels(pixel_values: torch.Tensor, tgt_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The vision encoder's input from the batch's uint8 strips: normalised, channels first, padding 0.

    Args:
        pixel_values: uint8 [S, P, L*P, 3] strips, channels last (docs/architecture.md).
        tgt_sizes: long [S, 2], (h, w) in patches; slice i fills the first h_i * w_i patches.
        dtype: the result's dtype (the model's compute dtype).

    Returns:
        [S, 3, P, L*P] in `dtype`, values in [-1, 1] and 0 past each slice's patches, as the
        reference's float32 pipeline pads them (2.5's vision encoder sees the padding).
    """
    if pixel_values.dtype != torch.uint8:
        raise TypeError(f"pixel_values must be uint8 strips from MiniCPMVCollator, got {pixel_values.dtype}")
    patch = pixel_values.shape[1]
    channels_first = pixel_values.permute(0, 3, 1, 2)  # moved while still 1 byte per value
    table = PIXEL_VALUES.to(pixel_values.device, dtype)
    values = table.index_select(0, channels_first.flatten().int()).view(channels_first.shape)  # 2x indexing's speed
    columns = torch.arange(pixel_values.shape[2], device=pixel_values.device)
    filled = columns < (tgt_sizes.to(pixel_values.device).prod(-1, keepdim=True) * patch)  # [S, L*P]
    return values.masked_fill_(~filled[:, None, None, :], 0)


class ImageTextMismatchError(ValueError):
    """The image placeholders of a batch do not line up with its slices."""


class MiniCPMV(PreTrainedModel, GenerationMixin):
    """Base class of the native MiniCPM-V 2.x models; a family subclass says how to build its parts."""

    config_class = MiniCPMVConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _keys_to_ignore_on_load_unexpected = [r"resampler\.pos_embed$"]

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        text_config = config.llm_config()
        # MiniCPM-2.4B (2.0) multiplies token embeddings by scale_emb; image features go in unscaled
        # (llama.cpp's converter divides resampler.proj by scale_emb for exactly this reason).
        self.text_embedding_scale = float(getattr(text_config, "scale_emb", 1.0))
        self.query_num = config.query_num
        vision_config = config.vpm_config()
        self.llm = self.build_llm(text_config)
        self.vpm = self.build_vision(vision_config)
        self.resampler = Resampler(
            config.query_num,
            text_config.hidden_size,
            text_config.hidden_size // RESAMPLER_HEAD_DIM,
            vision_config.hidden_size,
            fixed_query_pos=self.resampler_fixed_query_pos,
        )
        self.post_init()

    # -- family hooks -------------------------------------------------------------------------------

    resampler_fixed_query_pos = False

    def build_llm(self, text_config) -> PreTrainedModel:
        """The `llm` part: a causal LM whose keys are `model.*` and `lm_head.weight`."""
        raise NotImplementedError

    def build_vision(self, vision_config) -> nn.Module:
        """The `vpm` part."""
        raise NotImplementedError

    def encode_slices(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [S, 3, P, L*P] strips, tgt_sizes long [S, 2] -> features [S, query_num, hidden]."""
        return self.resampler(self.vpm(pixel_values, tgt_sizes), tgt_sizes)

    # -- transformers plumbing ------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        # peft's enable_input_require_grads hooks this module; embed_inputs calls this same module,
        # so LoRA with gradient checkpointing gets gradients (OpenBMB/MiniCPM-V#168).
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.xavier_uniform_(module.attn.in_proj_weight)
            init.zeros_(module.attn.in_proj_bias)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
            table = module.query_pos_table if module.fixed_query_pos else module.key_pos_table
            side = module.pos_embed.shape[0] if not module.fixed_query_pos else int(module.num_queries**0.5)
            init.copy_(module.pos_embed, table(side).to(module.pos_embed.dtype))

    # -- generation ---------------------------------------------------------------------------------

    # The image inputs are consumed by the prefill step: with a cache, later steps feed one new token
    # per sample and the features already sit in the cache (transformers drops `pixel_values` by
    # itself, but not the keys it does not know). Without a cache every step re-runs the whole
    # sequence, images included. Position ids come from GenerationMixin: the attention mask's
    # cumulative sum, so left padding is skipped and each prompt starts at 0, as in training.
    _PREFILL_ONLY_INPUTS = ("pixel_values", "tgt_sizes", "image_bound", "slice_counts")

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in self._PREFILL_ONLY_INPUTS:
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)

    # -- forward ------------------------------------------------------------------------------------

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        tgt_sizes: torch.Tensor | None,
        image_bound: torch.Tensor | None,
        slice_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with each slice's features written over its placeholder tokens.

        Returns:
            [B, T, hidden] input embeddings for the language model.

        Raises:
            ImageTextMismatchError: when bounds and slices disagree (counts, span lengths, ranges).
        """
        embeds = self.get_input_embeddings()(input_ids)
        if self.text_embedding_scale != 1.0:
            embeds = embeds * self.text_embedding_scale
        num_slices = 0 if pixel_values is None else pixel_values.shape[0]
        if num_slices == 0:
            if self.training and torch.is_grad_enabled():
                # Encode a tiny blank image and add 0 x its features: every rank then runs the vision
                # forward and backward, which ZeRO-3's parameter gathering and DDP both require.
                patch = getattr(self.config, "patch_size", 14)
                blank = embeds.new_zeros(1, 3, patch, 4 * patch)
                features = self.encode_slices(blank, torch.tensor([[2, 2]], device=embeds.device))
                embeds = embeds + features.sum() * 0
            return embeds

        self._check_image_bound(input_ids, image_bound, slice_counts, num_slices)
        features = self.encode_slices(normalize_pixels(pixel_values, tgt_sizes, embeds.dtype), tgt_sizes)
        span = torch.arange(self.query_num, device=embeds.device)
        rows = image_bound[:, :1].to(embeds.device).expand(-1, self.query_num)
        columns = image_bound[:, 1:2].to(embeds.device) + span
        return embeds.index_put((rows, columns), features.to(embeds.dtype))

    def _check_image_bound(
        self, input_ids: torch.Tensor, image_bound: torch.Tensor | None, slice_counts: torch.Tensor | None, num_slices: int
    ) -> None:
        if image_bound is None or image_bound.shape[0] != num_slices:
            found = 0 if image_bound is None else image_bound.shape[0]
            raise ImageTextMismatchError(
                f"the batch has {num_slices} image slices but {found} image placeholder spans"
            )
        lengths = image_bound[:, 2] - image_bound[:, 1]
        if bool((lengths != self.query_num).any()):
            raise ImageTextMismatchError(
                f"every image placeholder span must hold query_num={self.query_num} tokens; "
                f"got span lengths {sorted(set(lengths.tolist()))}"
            )
        if bool((image_bound[:, 1] < 0).any()) or bool((image_bound[:, 2] > input_ids.shape[1]).any()):
            raise ImageTextMismatchError(
                f"an image placeholder span lies outside the {input_ids.shape[1]}-token sequence"
            )
        if slice_counts is not None:
            per_sample = torch.bincount(image_bound[:, 0].cpu(), minlength=input_ids.shape[0])
            if not torch.equal(per_sample, slice_counts.cpu().to(per_sample.dtype)):
                raise ImageTextMismatchError(
                    f"placeholder spans per sample {per_sample.tolist()} differ from slices per sample "
                    f"{slice_counts.tolist()}"
                )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tgt_sizes: torch.Tensor | None = None,
        image_bound: torch.Tensor | None = None,
        slice_counts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Runs the model on a batch of the batch contract (docs/architecture.md).

        With `labels`, the loss is the mean cross-entropy of every supervised next token (or the
        sum divided by `num_items_in_batch`, which the Trainer passes under gradient accumulation),
        and logits are computed only at supervised positions and not returned: a 128k-entry
        vocabulary times every position would otherwise be the largest tensor of the step.

        Returns:
            CausalLMOutputWithPast with `loss` (given labels) or `logits` [B, T, vocab] (without).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, tgt_sizes, image_bound, slice_counts)
        if labels is not None:
            use_cache = False  # a training step has no later step to reuse keys and values
            if (
                attention_mask is not None
                and self.config._attn_implementation != "flash_attention_2"  # it skips padding by the mask
                and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            ):
                # Right padding only: causal attention never lets a real token see it, and without a
                # mask SDPA takes its causal kernel instead of materialising a T x T mask.
                attention_mask = None
        outputs = self.llm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if labels is None:
            return CausalLMOutputWithPast(
                logits=self.llm.lm_head(hidden), past_key_values=outputs.past_key_values
            )
        loss = next_token_loss(self.llm.lm_head, hidden, labels.to(hidden.device), num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)

def next_token_loss(
    lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of position t predicting labels[t + 1], over supervised positions only.

    The mean over supervised tokens, or the sum divided by `num_items_in_batch` (the Trainer's count
    under gradient accumulation). Logits are computed in `LOSS_CHUNKS` chunks, never all at once.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    positions, wanted = hidden[:, :-1][supervised], targets[supervised]
    loss = hidden.new_zeros((), dtype=torch.float32)
    for chunk, chunk_targets in zip(positions.tensor_split(LOSS_CHUNKS), wanted.tensor_split(LOSS_CHUNKS)):
        if torch.is_grad_enabled():
            loss = loss + checkpoint(_summed_cross_entropy, lm_head, chunk, chunk_targets, use_reentrant=False)
        else:
            loss = loss + _summed_cross_entropy(lm_head, chunk, chunk_targets)
    if num_items_in_batch is None:
        return loss / supervised.sum().clamp(min=1)
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)


def _summed_cross_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


__all__ = ["IGNORE_INDEX", "LOSS_CHUNKS", "RESAMPLER_HEAD_DIM", "ImageTextMismatchError", "MiniCPMV", "next_token_loss"]
