"""finetune: fine-tune MiniCPM-V vision-language models with LoRA or full training under DeepSpeed ZeRO.

The public API is imported lazily, so `finetune --help` and the launchers start fast.
"""

_EXPORTS = {
    "load_model": "finetune.models",
    "build_model": "finetune.models",
    "load_tokenizer": "finetune.models",
    "merge_adapter": "finetune.train.merge",
    "train": "finetune.train.recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
