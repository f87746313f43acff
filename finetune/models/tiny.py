"""`finetune make-tiny`: tiny random-weight MiniCPM-V models in hub format, for tests and the demo.

The configs are the released ones (same fields, same layout) with small dimensions, so that
`load_model` reads a tiny directory through exactly the code path of a real checkpoint. Widths keep
the real constraints: the language model's width is a multiple of 128 (the resampler's head size),
2.0's query count is a square (its fixed query position table), and the NaViT position table keeps
its real 70 x 70 size (image_size 980), since 2.5's position quirk depends on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import HF_NATIVE_FAMILIES, Family, NativeFamily
from .loading import build_model
from .tokenizer import load_tokenizer, special_token_ids, write_tiny_tokenizer

_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
    "AutoModel": "modeling_minicpmv.MiniCPMV",
    "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
}

_TINY_LLM = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
}
_TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "patch_size": 14}

_FAMILY_FIELDS: dict[Family, dict] = {
    "2.0": {
        "dim_model_base": 32,
        "drop_vision_last_layer": True,
        "initializer_range": 0.1,
        "max_slice_nums": 9,
        "num_key_value_heads": 4,
        "query_num": 16,
        "rope_theta": 10000.0,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "scale_resolution": 448,
        "use_cache": True,
        "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
        # Not in the released 2.0 config, which names its encoder instead; our loader reads it to
        # shrink the encoder (3 layers, the last dropped as in the real model).
        "vision_config": {**_TINY_VISION, "num_hidden_layers": 3, "image_size": 384},
    },
    "2.5": {
        "version": "2.5",
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "initializer_range": 0.02,
        "num_key_value_heads": 2,
        "query_num": 16,
        "rope_theta": 500000.0,
        "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        "use_cache": False,
        "vision_config": {**_TINY_VISION, "num_hidden_layers": 2, "image_size": 980, "model_type": "idefics2"},
    },
    "2.6": {
        "version": 2.6,
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "initializer_range": 0.02,
        "num_key_value_heads": 2,
        "query_num": 16,
        "rope_theta": 1000000.0,
        "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        "use_image_id": True,
        "vision_batch_size": 16,
        "use_cache": True,
        "vision_config": {**_TINY_VISION, "num_hidden_layers": 2, "image_size": 980, "model_type": "siglip"},
    },
}


def tiny_config(family: Family, vocab_size: int, bos_token_id: int | None, eos_token_id: int) -> dict:
    """config.json of a tiny model of `family`, in the released layout."""
    return {
        "architectures": ["MiniCPMV"],
        "auto_map": _AUTO_MAP,
        "model_type": "minicpmv",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "image_size": 448,
        "mm_use_im_start_end": True,
        "patch_size": 14,
        "rms_norm_eps": 1e-6 if family == "2.6" else 1e-5,
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
        **_TINY_LLM,
        **_FAMILY_FIELDS[family],
    }


def write_tiny_model(family: Family | NativeFamily, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes a tiny random-weight model of `family` to `out_dir` (config, safetensors, tokenizer).

    "llava" and "4.6" are written by `hf_native.write_tiny_hf_native` (transformers' classes).

    Returns:
        The directory, loadable with `finetune.models.load_model`.
    """
    if family in HF_NATIVE_FAMILIES.values():
        from .hf_native import write_tiny_hf_native

        return write_tiny_hf_native(family, out_dir, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(family, out)
    tokenizer = load_tokenizer(out)
    tokens = special_token_ids(tokenizer)
    config = tiny_config(family, len(tokenizer), tokens.bos, tokens.eos)
    torch.manual_seed(seed)
    model = build_model(config, device="cpu")
    model.save_pretrained(out)
    # save_pretrained writes the config through transformers; rewrite it so the file keeps the
    # released layout (no transformers-only fields), as a real checkpoint has it.
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(family, config), indent=2) + "\n")
    return out


def _preprocessor_config(family: Family, config: dict) -> dict:
    preprocessor = {
        "image_processor_type": "MiniCPMVImageProcessor",
        "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": 9,
        "scale_resolution": 448,
        "patch_size": 14,
        "image_feature_size": config["query_num"],
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
    }
    if family != "2.0":
        preprocessor["version"] = float(family)
    if family == "2.6":
        preprocessor.update({"im_id_start": "<image_id>", "im_id_end": "</image_id>", "use_image_id": True})
    return preprocessor


__all__ = ["tiny_config", "write_tiny_model"]
