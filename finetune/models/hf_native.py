"""The second model path: transformers' own image-text-to-text classes, with their processors.

- **llava**: `LlavaForConditionalGeneration`, the Llama3-V shape (a SigLIP vision tower, a two-layer
  projector, a Llama-3 language model) and its kin (LLaVA-1.5, Bunny, ...); `LlavaProcessor` turns
  each `<image>` into one token per vision patch.
- **4.6**: `MiniCPMV4_6ForConditionalGeneration` (spec §6) with `MiniCPMV4_6Processor`, which slices
  each image and writes its placeholder (source, then rows of slices, `<image_id>` tags).

The family comes from config.json's `model_type` (`config.detect_family`); checkpoints are hub
directories that `from_pretrained` and `AutoProcessor` read. Nothing here re-implements a model: the
toolkit only names the parts of each class (`PARTS`), its default LoRA targets (`LORA_TARGETS`) and
writes tiny random models (`write_tiny_hf_native`) for tests and demos.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import NativeFamily, detect_family
from .loading import CheckpointError, read_config
from .minicpmv import next_token_loss
from .tokenizer import build_tiny_bpe

logger = logging.getLogger(__name__)

MODEL_CLASS_NAMES: dict[NativeFamily, str] = {
    "llava": "LlavaForConditionalGeneration",
    "4.6": "MiniCPMV4_6ForConditionalGeneration",
}

# Module paths (from the top-level model) of what --tune_vision, --tune_resampler and --tune_llm
# train. 4.6's window-attention `vit_merger` sits inside the vision tower and goes with it.
PARTS: dict[NativeFamily, dict[str, tuple[str, ...]]] = {
    "llava": {
        "vision": ("model.vision_tower",),
        "resampler": ("model.multi_modal_projector",),
        "llm": ("model.language_model", "lm_head"),
    },
    "4.6": {
        "vision": ("model.vision_tower",),
        "resampler": ("model.merger",),
        "llm": ("model.language_model", "lm_head"),
    },
}

# Default LoRA targets: the language model's attention. Qwen3.5 (4.6) interleaves gated-delta-net
# layers (`linear_attn`, three of every four) with full attention, so their input and output
# projections count as attention too; Llama has only `self_attn`.
LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))"
)
# --lora_on_vision: the vision tower's attention (SigLIP names, also 4.6's window merger's).
VISION_LORA_TARGETS = r"model\.vision_tower\..*self_attn\.(q_proj|k_proj|v_proj|out_proj)"


def model_class(family: NativeFamily) -> type[nn.Module]:
    import transformers

    return getattr(transformers, MODEL_CLASS_NAMES[family])


def native_family(model: nn.Module) -> NativeFamily | None:
    """The family of a transformers-native model (also under a peft wrapper), else None."""
    config = getattr(model, "config", None)
    try:
        family = detect_family(config.to_dict()) if config is not None else None
    except ValueError:
        return None
    return family if family in MODEL_CLASS_NAMES else None


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def build_hf_native(
    path_or_config: str | Path | dict,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """The model a config.json describes, with random weights (or none, on "meta")."""
    from transformers import AutoConfig
    from transformers.modeling_utils import set_zero3_state

    raw = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
    family = detect_family(raw)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(raw["model_type"], **fields)
    # Inside a ZeRO-3 run (the memory estimate counts the model on "meta" at start), transformers
    # would build the model and its sub-models (AutoModel.from_config) under zero.Init: collective
    # calls that a rank loading the real model never joins. `set_zero3_state` is transformers' own
    # "zero.Init is already active" switch; under it they are built plainly.
    with torch.device(device), set_zero3_state():
        model = model_class(family)._from_config(config, attn_implementation=attn_implementation)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_hf_native(
    path: str | Path,
    family: NativeFamily,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Loads a hub-format directory into its transformers class; every weight must match by name.

    Raises:
        CheckpointError: weights missing from the checkpoint or left over in it (both listed).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, info = model_class(family).from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    if info["missing_keys"] or info["unexpected_keys"]:
        raise CheckpointError(
            f"{path}: the weights do not match a {MODEL_CLASS_NAMES[family]}; "
            f"missing: {sorted(info['missing_keys'])[:10]}, unexpected: {sorted(info['unexpected_keys'])[:10]}"
        )
    _keep_used_weight_conversions(model)
    _touch_vision_on_text_only_batches(model, family)
    _loss_at_supervised_positions(model, family)
    if family == "4.6":
        model.model.merger.__class__ = _batched_merger_class()  # same module and parameters, another forward
    return model


def _keep_used_weight_conversions(model: nn.Module) -> None:
    """Keeps, of the key renamings transformers recorded while loading, only those the checkpoint used.

    `save_pretrained` reverses `model._weight_conversions` to write the checkpoint's own key names.
    The regular loader records only the transforms that matched a key (`WeightTransform.was_used`);
    the ZeRO-3 loader (`integrations/deepspeed.py: _load_state_dict_into_zero3_model`, transformers
    5.x) records every registered one, legacy fix-ups included. Reversed, the unused ones rename the
    saved keys: a llava trained under ZeRO-3 would save `language_model.model.model.*` and
    `vision_tower.vision_model.*` for the base's `language_model.model.*` and `vision_tower.*`
    (transformers 5 reads them back only through those legacy fix-ups).
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def _touch_vision_on_text_only_batches(model: nn.Module, family: NativeFamily) -> None:
    """In training, a batch without images still runs the vision tower and projector once.

    transformers' classes skip the vision path when `pixel_values` is None, so on that rank those
    parameters get no gradient and are never gathered; ZeRO-3 then waits for them forever and DDP
    reports unused parameters. A tiny blank image is encoded and 0 x its features added to the
    loss, as the native 2.x models do (`MiniCPMV.embed_inputs`). It is encoded just before the
    language model runs, where a batch with images has encoded them (after the token embeddings):
    ZeRO-3 gathers parameters in module-call order, and that order must be the same on every rank.
    """
    state: dict[str, Any] = {"blank": False, "features": None}

    def note_text_only(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["blank"] = (module.training and torch.is_grad_enabled() and kwargs.get("pixel_values") is None
                          and kwargs.get("labels") is not None)  # a loss to attach the features to

    def encode_blank(language_model: nn.Module, args: tuple, kwargs: dict) -> None:
        if not state["blank"]:
            return
        state["blank"] = False
        inner = model.model
        weight = inner.get_input_embeddings().weight
        if family == "4.6":
            patch = model.config.vision_config.patch_size
            blank = torch.zeros(1, 3, patch, 16 * patch, dtype=weight.dtype, device=weight.device)
            sizes = torch.tensor([[4, 4]], dtype=torch.int32, device=blank.device)
            features = inner.get_image_features(blank, sizes).pooler_output
        else:
            size = model.config.vision_config.image_size
            blank = torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
            features = inner.get_image_features(blank).pooler_output
        state["features"] = sum(f.sum() for f in features)

    def add_to_loss(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        features, state["features"] = state["features"], None
        if features is not None:
            output.loss = output.loss + features * 0
        return output

    model.register_forward_pre_hook(note_text_only, with_kwargs=True)
    model.model.language_model.register_forward_pre_hook(encode_blank, with_kwargs=True)
    model.register_forward_hook(add_to_loss, with_kwargs=True)


def _loss_at_supervised_positions(model: nn.Module, family: NativeFamily) -> None:
    """With labels, the loss of the 2.x models: `next_token_loss`, logits only where a label is, in chunks.

    transformers' classes apply lm_head at every position and their loss upcasts the logits to fp32,
    about 3 GiB at the loss's peak for a 128k vocabulary and 2048 tokens. Here the class runs without
    labels (llava with `logits_to_keep` empty; 4.6's class has no such argument, and its bf16 logits
    are dropped), and the loss comes from the language model's last hidden state. Labels keep the
    transformers convention (unshifted): the same loss value, less memory. Registered after the blank
    image's hooks (they look for labels first) and run before its loss hook (it adds to this loss).
    """
    state: dict[str, Any] = {}

    def take_labels(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("labels") is None:
            return None
        state["labels"], state["items"] = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
        if family == "llava":
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=state["labels"].device)
        return args, kwargs

    def keep_hidden(language_model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if "labels" in state:
            state["hidden"] = output.last_hidden_state

    def loss(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if "labels" not in state:
            return output
        labels, items, hidden = state.pop("labels"), state.pop("items"), state.pop("hidden")
        output.logits = None  # freed before the loss's chunks run
        output.loss = next_token_loss(module.lm_head, hidden, labels.to(hidden.device), items)
        return output

    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    model.model.language_model.register_forward_hook(keep_hidden, with_kwargs=True)
    model.register_forward_hook(loss, with_kwargs=True, prepend=True)


@functools.cache
def _batched_merger_class():
    from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6Merger

    class MiniCPMV4_6BatchedMerger(MiniCPMV4_6Merger):
        """`MiniCPMV4_6Merger` with a module-call sequence that does not depend on the slice count.

        The class's own forward calls its MLP once per slice and returns one tensor per slice. ZeRO-3
        gathers a module's parameters at each call and hooks each output tensor for the backward, and
        it needs every rank to make the same calls (else it stops on a trace mismatch or hangs in a
        collective). Here each merge round's MLP runs once on every slice's tokens together (it works
        token by token: the same features) and the features come back as one tensor, in a list of
        one: the model's forward concatenates the list anyway. Same parameters, same names.
        """

        def forward(self, hidden_states: torch.Tensor, target_sizes: torch.Tensor) -> list[torch.Tensor]:
            merge_h, merge_w = self.merge_kernel_size
            sizes = [(int(h), int(w)) for h, w in target_sizes.tolist()]
            features = hidden_states[0]
            for round_index, mlp in enumerate(self.mlp):
                if any(h % merge_h or w % merge_w for h, w in sizes):
                    raise ValueError(f"patch grids {sizes} must be divisible by the merge kernel "
                                     f"{self.merge_kernel_size} at merge round {round_index}")
                # Each merge_h x merge_w window of a slice becomes one token, row by row.
                windows = [piece.view(h // merge_h, merge_h, w // merge_w, merge_w, -1).permute(0, 2, 1, 3, 4)
                           .reshape((h // merge_h) * (w // merge_w), -1)
                           for piece, (h, w) in zip(features.split([h * w for h, w in sizes]), sizes)]
                features = mlp(torch.cat(windows))
                sizes = [(h // merge_h, w // merge_w) for h, w in sizes]
            return [features]

    return MiniCPMV4_6BatchedMerger


# ---------------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------------


def load_processor(path: str | Path, family: NativeFamily):
    """The directory's processor (`AutoProcessor`), its tokenizer padding on the right.

    MiniCPM-V 4.6's processor also holds a video processor, and transformers' video processors
    need torchvision. Where torchvision cannot be imported (the CPU-only torch wheels have no
    matching torchvision on PyPI), the same processor is built without it: image and text handling
    are the class's own, only videos are unavailable.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as error:
        if family != "4.6" or "torchvision" not in str(error).lower():
            raise
        logger.info("torchvision is not installed: MiniCPM-V 4.6's processor is built without videos")
        processor = _image_text_processor_class().from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise CheckpointError(f"{path}: AutoProcessor found no image processor (preprocessor_config.json)")
    processor.tokenizer.padding_side = "right"
    return processor


def _image_text_processor_class():
    from transformers import MiniCPMV4_6Processor
    from transformers.processing_utils import ProcessorMixin

    class MiniCPMV4_6ImageTextProcessor(MiniCPMV4_6Processor):
        """`MiniCPMV4_6Processor` without its video processor (the attributes its `__init__` sets,
        less the video ones)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.slice_mode = self.image_processor.slice_mode
            self.video_slice_mode = False
            self.default_use_image_id = self.image_processor.use_image_id
            self.image_token_divisor = 4 if self.image_processor.downsample_mode == "4x" else 16
            self.video_token_divisor = 16
            for name in ("image_token", "video_token", "image_token_id", "video_token_id", "image_start_token",
                         "image_end_token", "slice_start_token", "slice_end_token", "image_id_start_token",
                         "image_id_end_token"):
                setattr(self, name, getattr(tokenizer, name))

    return MiniCPMV4_6ImageTextProcessor


# ---------------------------------------------------------------------------------------------------
# Tiny random models for tests and demos
# ---------------------------------------------------------------------------------------------------

_TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
_TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "patch_size": 14}
_TINY_MAX_LENGTH = 2048

# Llama-3's chat format (the template MiniCPM-Llama3-V 2.5 and Llama-3 LLaVAs use), rendering
# transformers' content lists (`{"type": "image"}` becomes the image token) as well as plain strings.
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{% set content = message['content'] %}{% else %}"
    "{% set ns = namespace(content='') %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.content = ns.content + '<image>' %}"
    "{% elif part['type'] == 'text' %}{% set ns.content = ns.content + part['text'] %}{% endif %}{% endfor %}"
    "{% set content = ns.content %}{% endif %}{{ content | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML, as Qwen3.5 and MiniCPM-V 4.6 use it; an image is the processor's image token.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<unk>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens of each tiny vocabulary, and the processor-facing names the tokenizer gives them
# (transformers reads `tokenizer.image_token` etc. from tokenizer_config.json's named tokens).
_TINY_TOKENS: dict[NativeFamily, dict[str, Any]] = {
    "llava": {
        "specials": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<image>", "<pad>"),
        "named": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>"},
        "extra": {"image_token": "<image>"},
        "bos": "<|begin_of_text|>",
        "template": _LLAMA3_TEMPLATE,
    },
    "4.6": {
        "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<slice>", "</slice>",
                     "<image_id>", "</image_id>", "<unk>", "<video>"),
        "named": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "extra": {
            "image_token": "<unk>", "video_token": "<video>", "image_start_token": "<image>",
            "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
            "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
        },
        "bos": None,
        "template": _CHATML_TEMPLATE,
    },
}


def write_tiny_hf_native(family: NativeFamily, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes a tiny random-weight model of `family` in hub format.

    The directory holds what transformers writes for the real models: config.json and
    model.safetensors (`save_pretrained`), tokenizer.json and tokenizer_config.json with the
    processor's named image tokens, chat_template.jinja, preprocessor_config.json and (llava)
    processor_config.json. `AutoProcessor` and the model class load it offline.

    Shapes: a 2-layer, 128-wide language model (4.6: one gated-delta-net layer, one full-attention
    layer, as Qwen3.5 interleaves them), a 2-layer, 64-wide vision tower. llava: 224-pixel images,
    256 image tokens each. 4.6: slices of at most 448 x 448 pixels, the real position table (980 /
    14 = 70 x 70) and the window merger after the first vision layer.

    Returns:
        The directory, loadable with `finetune.models.load_model`.
    """
    import transformers
    from transformers import TokenizersBackend

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = _TINY_TOKENS[family]
    tokenizer = TokenizersBackend(
        tokenizer_object=build_tiny_bpe(spec["specials"], prepend_bos=spec["bos"]),
        extra_special_tokens=spec["extra"], model_max_length=_TINY_MAX_LENGTH, padding_side="right",
        clean_up_tokenization_spaces=False, **spec["named"],
    )
    tokenizer.chat_template = spec["template"]
    config = _tiny_config(family, tokenizer)
    # The PIL backend needs no torchvision; its preprocessor_config.json names the class without the
    # backend suffix, as the released files do, and AutoImageProcessor picks a backend when loading.
    image_processor_class = "SiglipImageProcessorPil" if family == "llava" else "MiniCPMV4_6ImageProcessorPil"
    image_processor = getattr(transformers, image_processor_class)(**_tiny_image_processor_kwargs(family))
    processor = _tiny_processor(family, image_processor, tokenizer, config)

    torch.manual_seed(seed)
    model = model_class(family)._from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family == "4.6" and not hasattr(processor, "video_processor"):
        _as_released_processor(out / "processor_config.json")
    return out


def _tiny_config(family: NativeFamily, tokenizer):
    from transformers import LlavaConfig, MiniCPMV4_6Config

    tokens = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    if family == "llava":
        return LlavaConfig(
            text_config={"model_type": "llama", **_TINY_TEXT, **tokens, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
            # SigLIP has no CLS token and, in LLaVA models, no pooling head.
            vision_config={"model_type": "siglip_vision_model", **_TINY_VISION, "image_size": 224,
                           "vision_use_head": False},
            image_token_id=tokenizer.image_token_id,
            image_seq_length=(224 // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
        )
    return MiniCPMV4_6Config(
        text_config={
            "model_type": "qwen3_5_text", **_TINY_TEXT, **tokens, "head_dim": 32,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            # Qwen3.5's rotary layout: a quarter of each head rotates, split into 3-D sections.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True, "partial_rotary_factor": 0.25},
        },
        vision_config={**_TINY_VISION, "image_size": 980},
        insert_layer_id=0,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        image_size=448,
    )


def _tiny_image_processor_kwargs(family: NativeFamily) -> dict:
    if family == "llava":
        return {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"scale_resolution": 448, "max_slice_nums": 9, "patch_size": 14, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3}


def _tiny_processor(family: NativeFamily, image_processor, tokenizer, config):
    if family == "llava":
        from transformers import LlavaProcessor

        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=0,
            chat_template=tokenizer.chat_template,
        )
    try:
        from transformers import MiniCPMV4_6Processor, MiniCPMV4_6VideoProcessor

        video_processor = MiniCPMV4_6VideoProcessor(scale_resolution=448, max_slice_nums=1)
        return MiniCPMV4_6Processor(image_processor, video_processor, tokenizer, chat_template=tokenizer.chat_template)
    except ImportError:  # no torchvision: the same files, less video_preprocessor_config.json
        return _image_text_processor_class()(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def _as_released_processor(path: Path) -> None:
    """processor_config.json as `MiniCPMV4_6Processor` writes it, when it was saved without torchvision
    (by the image-text class): its class name, and the video processor with its defaults."""
    content = json.loads(path.read_text())
    content["processor_class"] = "MiniCPMV4_6Processor"
    content["video_processor"] = {"video_processor_type": "MiniCPMV4_6VideoProcessor"}
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


__all__ = [
    "LORA_TARGETS",
    "MODEL_CLASS_NAMES",
    "PARTS",
    "VISION_LORA_TARGETS",
    "build_hf_native",
    "load_hf_native",
    "load_processor",
    "model_class",
    "native_family",
    "write_tiny_hf_native",
]
