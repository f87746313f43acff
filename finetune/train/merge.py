"""`finetune merge`: fold a LoRA adapter, and every part trained with it, into a standalone model.

    finetune merge --base BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR [--dtype bfloat16]

ADAPTER_DIR is what a `--use_lora true` run saved (its output_dir or a checkpoint-N in it). The merged
directory has the base checkpoint's released layout, so `load_model`, the released modeling code
(through config.json's `auto_map`) and serving engines read it like the base:

- the weights: safetensors with exactly the base checkpoint's parameter names, in the base's shard
  files (same names, same split), each tensor in the dtype the base stores it in, or in `--dtype`;
- config.json: the base's, byte for byte; with `--dtype` only the dtype field changes;
- the tokenizer: the base's files, byte for byte, when the adapter's tokenizer (the one training
  saved) is the same tokenizer: same vocabulary, special tokens and chat template. Training never
  adds tokens, so this is the normal case, and it matters: transformers 5 re-saves a tokenizer in its
  own format (`tokenizer_class: TokenizersBackend`, `extra_special_tokens` as a list, no
  `add_bos_token`, the chat template in a separate file), which the transformers 4 releases that
  the released remote code was written for may read differently (not checked here). An adapter
  whose tokenizer differs (edited by the user) has its files laid over the base's (files that
  transformers 5 no longer writes, such as tokenizer.model, stay the base's);
- preprocessor_config.json, generation_config.json and the remote-code *.py files: the base's;
- merge_info.json: base, adapter (and a hash of its weights), dtype and library versions.

How: `load_model(base)`, `PeftModel.from_pretrained`, then peft's `merge_and_unload`, which folds
LoRA into the weights, puts the trained copies of `modules_to_save` (resampler, vision encoder, full
embeddings) in place of the originals and writes trainable-token rows into the embedding matrix.
Before anything is written the merge checks that every adapter tensor was used, that those copies
and rows are in the merged weights, and that no peft name (lora_, modules_to_save, original_module,
base_layer, token_adapter) is left.

Output directory rules. The result is written into a hidden sibling (`.NAME.merging-XXXXXXXX`) and
renamed into place only when complete, so a crash never leaves a half-merged MERGED_DIR (a killed run
leaves that sibling, which can be deleted). MERGED_DIR may be missing, empty, or the output of an
earlier merge (it holds merge_info.json): that one is replaced, so merging again with the same
inputs gives a byte-identical directory. Anything else is refused, as are the base and adapter
directories themselves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.config import UnsupportedModelError, detect_family
from ..models.hf_native import MODEL_CLASS_NAMES, native_family
from ..models.loading import MODEL_CLASSES, CheckpointError, load_model, read_config
from ..models.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"
MERGE_INFO_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Written by the tokenizer's save_pretrained in transformers 4 and 5 (and the released checkpoints).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
BASE_SIDE_FILES = (
    "preprocessor_config.json", "generation_config.json", "processor_config.json", "video_preprocessor_config.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_NAME_PARTS = ("lora_", "modules_to_save", "original_module", "base_layer", "token_adapter")
_PEFT_PREFIX = "base_model.model."
_SHARD_BYTES = 5 * 1024**3  # only for bases without safetensors: transformers' default shard size
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MergeError(CheckpointError):
    """The base, the adapter or the output directory cannot be merged; the message says which and why.

    A `CheckpointError`, so `cli.py`'s handler for unusable model directories shows it too.
    """


# ---------------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------------


def merge_adapter(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Writes base + adapter as one standalone model directory that `load_model` reads.

    Args:
        base_dir: the hub-format model the adapter was trained on.
        adapter_dir: a peft adapter directory from a LoRA run (adapter_config.json + weights).
        out_dir: where the merged model goes; missing, empty or an earlier merge's output.
        dtype: torch dtype or its name ("float16", "bfloat16", "float32") of the written weights;
            None keeps the dtype each tensor has in the base checkpoint (and config.json unchanged).

    Returns:
        `out_dir` as a resolved Path.

    Raises:
        MergeError: a directory is missing or incomplete, `out_dir` holds something other than an
            earlier merge, the adapter was trained on another family or does not fit the base's
            shapes, adapter tensors go unused, or the merged weights do not match the base's names.
        CheckpointError, UnsupportedModelError: the base directory itself cannot be loaded.
    """
    base, adapter, out = (Path(p).expanduser().resolve() for p in (base_dir, adapter_dir, out_dir))
    out_dtype = _parse_dtype(dtype)
    # Everything that can be checked without the weights is checked first: a bad path costs
    # milliseconds, not a model load.
    adapter_config, adapter_weights = _check_adapter_dir(adapter)
    family = _check_base_dir(base, adapter, adapter_config)
    _check_out_dir(out, base, adapter)
    layout = _base_layout(base)
    tokenizer_source = _tokenizer_source(base, adapter)

    # Merge at float32 whenever the base stores or the output asks for it; else at the base's dtype
    # (peft computes the LoRA product in float32 on the CPU either way).
    stored = {d for d in layout.dtypes.values() if d.is_floating_point} if layout else set()
    compute_dtype = torch.float32 if torch.float32 in stored | {out_dtype} else None
    model = load_model(base, dtype=compute_dtype)
    adapter_tensors = load_peft_weights(str(adapter), device="cpu")
    peft_model = _apply_adapter(model, base, adapter, adapter_tensors)
    expected = _expected_after_merge(adapter, adapter_config, adapter_tensors)
    del adapter_tensors
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as error:  # safe_merge: NaN or inf in the merged weights
        raise MergeError(f"merging {adapter} into {base} failed: {error}") from None
    state = _merged_state_dict(merged, layout, base, adapter, expected)
    layout = layout or _layout_from_state(state)
    written_dtypes = {key: out_dtype if out_dtype is not None and state[key].is_floating_point()
                      else layout.dtypes[key] for key in layout.keys()}

    info = {
        "merge_info_version": MERGE_INFO_VERSION,
        "base": str(base),
        "adapter": str(adapter),
        "family": family,
        "adapter_weights_sha256": _sha256(adapter_weights),
        "dtype": None if out_dtype is None else _dtype_name(out_dtype),
        "tokenizer_from": "base" if tokenizer_source == base else "adapter",
        "weights_dtypes": sorted({_dtype_name(d) for d in written_dtypes.values()}),
        "adapter_config": {key: adapter_config.get(key) for key in (
            "peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "trainable_token_indices",
            "use_rslora", "use_dora", "peft_version")},
        "versions": {name: _version(name) for name in
                     ("finetune", "torch", "transformers", "peft", "safetensors")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_weights(staging, state, layout, written_dtypes)
        _write_config(staging, base, out_dtype)
        _copy_side_files(staging, base, tokenizer_source)
        _write_json(staging / MERGE_INFO, info)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged %s into %s: %s", adapter, base, out)
    return out


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise MergeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _check_adapter_dir(adapter: Path) -> tuple[dict, Path]:
    if not adapter.is_dir():
        raise MergeError(f"adapter directory {adapter} does not exist")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        hint = (" It holds config.json: a full fine-tune is already a standalone model; load it with "
                "load_model instead of merging." if (adapter / "config.json").is_file() else
                " Point --adapter at the output_dir (or a checkpoint-N) of a --use_lora run.")
        raise MergeError(f"{adapter} has no adapter_config.json, so it is no peft adapter.{hint}")
    weights = next((adapter / name for name in ADAPTER_WEIGHT_FILES if (adapter / name).is_file()), None)
    if weights is None:
        raise MergeError(f"{adapter} has adapter_config.json but no adapter weights "
                         f"({' or '.join(ADAPTER_WEIGHT_FILES)}); was the save cut off?")
    adapter_config = json.loads(config_file.read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise MergeError(f"{adapter}: peft_type {adapter_config.get('peft_type')!r}; only LoRA adapters merge")
    return adapter_config, weights


def _check_base_dir(base: Path, adapter: Path, adapter_config: dict) -> str:
    """The base's family; refuses an adapter recorded as trained on another family."""
    if not base.is_dir():
        raise MergeError(f"base model directory {base} does not exist")
    family = detect_family(read_config(base))
    class_names = {f: cls.__name__ for f, cls in MODEL_CLASSES.items()} | MODEL_CLASS_NAMES
    base_class = class_names[family]
    trained_class = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if trained_class and trained_class != base_class:
        trained = next((f for f, name in class_names.items() if name == trained_class), "?")
        raise MergeError(f"the adapter in {adapter} was trained on a MiniCPM-V {trained} model "
                         f"({trained_class}), but {base} is MiniCPM-V {family} ({base_class})")
    run_config = adapter / "run_config.json"
    if run_config.is_file():
        trained = json.loads(run_config.read_text()).get("arguments", {}).get("family")
        if trained and trained != family:
            raise MergeError(f"the adapter in {adapter} was trained on MiniCPM-V {trained} "
                             f"(run_config.json), but {base} is MiniCPM-V {family}")
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and Path(recorded).expanduser().resolve() != base:
        # Directories move between machines; the checks above and the shapes decide, not the path.
        logger.warning("the adapter records its base as %s; merging into %s", recorded, base)
    return family


def _check_out_dir(out: Path, base: Path, adapter: Path) -> None:
    for name, source in (("base", base), ("adapter", adapter)):
        if source == out or source.is_relative_to(out):
            raise MergeError(f"--out {out} would replace the {name} directory {source}; choose another")
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_INFO).is_file():
        raise MergeError(f"--out {out} is not empty and holds no earlier merge ({MERGE_INFO}); "
                         "choose a new or empty directory")


def _tokenizer_source(base: Path, adapter: Path) -> Path:
    """The directory whose tokenizer files the merged model gets (see the module docstring)."""
    if not any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return base
    try:
        base_tokenizer, adapter_tokenizer = load_tokenizer(base), load_tokenizer(adapter)
    except (OSError, ImportError, ValueError) as error:  # e.g. 2.0's tokenizer.model without sentencepiece
        logger.warning("could not compare the adapter's tokenizer with the base's (%s); using the adapter's", error)
        return adapter

    def identity(tokenizer) -> tuple:
        special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return tokenizer.get_vocab(), special, tokenizer.chat_template

    if identity(base_tokenizer) == identity(adapter_tokenizer):
        return base
    logger.warning("the tokenizer in %s differs from the base's; the merged model gets its files", adapter)
    return adapter


# ---------------------------------------------------------------------------------------------------
# The base's weight layout
# ---------------------------------------------------------------------------------------------------


class _Layout:
    """Which shard file holds which parameter, and the dtype the base stores it in."""

    def __init__(self, shards: dict[str, list[str]], dtypes: dict[str, torch.dtype], indexed: bool) -> None:
        self.shards = shards  # file name -> parameter names, in file order
        self.dtypes = dtypes
        self.indexed = indexed  # write model.safetensors.index.json

    def keys(self) -> list[str]:
        return [key for keys in self.shards.values() for key in keys]

    def file_of(self, key: str) -> str:
        return next(name for name, keys in self.shards.items() if key in keys)


def _read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _base_layout(base: Path) -> _Layout | None:
    """The base's safetensors layout; None for a base stored otherwise (pytorch_model.bin)."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (base / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shards, dtypes = {}, {}
    for name in files:
        if not (base / name).is_file():
            raise MergeError(f"{base}: shard {name} named by model.safetensors.index.json is missing")
        header = _read_safetensors_header(base / name)
        shards[name] = list(header)
        for key, entry in header.items():
            dtypes[key] = _SAFETENSORS_DTYPES.get(entry["dtype"], torch.float32)
    return _Layout(shards, dtypes, indexed=index.is_file())


def _layout_from_state(state: dict[str, torch.Tensor]) -> _Layout:
    """transformers-style shards of at most 5 GiB, for a base without safetensors."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > _SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) == 1:
        return _Layout({"model.safetensors": groups[0]}, {k: t.dtype for k, t in state.items()}, indexed=False)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return _Layout(dict(zip(names, groups)), {k: t.dtype for k, t in state.items()}, indexed=True)


# ---------------------------------------------------------------------------------------------------
# Adapter on base, and what the merge must produce
# ---------------------------------------------------------------------------------------------------


def _apply_adapter(model, base: Path, adapter: Path, adapter_tensors: dict[str, torch.Tensor]) -> PeftModel:
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        # Shape mismatches (another model size), target modules the base lacks, and tensors a
        # module of the base needs but the adapter lacks (peft raises a bare KeyError) end up here.
        if isinstance(error, KeyError):
            detail = f"the adapter has no tensor {error.args[0]!r}, which this base needs"
        else:
            detail = "\n  ".join(str(error).strip().splitlines()[:8])
        raise MergeError(f"the adapter in {adapter} does not fit the base model in {base}:\n  {detail}") from None
    # peft loads non-strictly and only warns; a tensor the base had no place for is a wrong base.
    saved = set(adapter_tensors)
    wanted = set(get_peft_model_state_dict(peft_model))
    unused, missing = sorted(saved - wanted), sorted(wanted - saved)
    if unused or missing:
        raise MergeError(
            f"the adapter in {adapter} does not fit the base model in {base}: "
            f"{len(unused)} adapter tensors have no place in the base {unused[:5]}; "
            f"{len(missing)} tensors the adapter config implies are not in the adapter {missing[:5]}"
        )
    return peft_model


def _expected_after_merge(adapter: Path, adapter_config: dict, adapter_tensors: dict[str, torch.Tensor]) -> dict:
    """Merged values that are known before merging: the trained copies of whole modules
    (`modules_to_save`) and the trained embedding rows (`trainable_token_indices`)."""
    whole: dict[str, torch.Tensor] = {}
    rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    token_indices = adapter_config.get("trainable_token_indices")
    for key, tensor in adapter_tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if "lora_" in name or ".base_layer." in name:
            # peft also saves the frozen base weight of a LoRA-wrapped embedding or lm_head
            # (save_embedding_layers); merging adds the LoRA delta to it, so it is no merged value.
            continue
        if name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name.removesuffix(".token_adapter.trainable_tokens_delta")
            if isinstance(token_indices, dict):
                indices = next((v for k, v in token_indices.items() if module == k or module.endswith("." + k)), None)
            else:
                indices = token_indices
            if indices is None or len(indices) != tensor.shape[0]:
                raise MergeError(f"{adapter}: cannot tell which embedding rows {key} holds "
                                 f"(trainable_token_indices {token_indices})")
            rows[f"{module}.weight"] = (list(indices), tensor)
        else:
            whole[name] = tensor
    return {"whole": whole, "rows": rows}


def _merged_state_dict(merged, layout: _Layout | None, base: Path, adapter: Path, expected: dict) -> dict:
    state = merged.state_dict()
    leftovers = [key for key in state if any(part in key for part in PEFT_NAME_PARTS)]
    if leftovers:
        raise MergeError(f"peft left adapter parameters in the merged model: {leftovers[:5]}")
    for key, tensor in expected["whole"].items():
        if key not in state or not torch.equal(state[key], tensor.to(state[key].dtype)):
            raise MergeError(f"the trained copy of {key} from {adapter} is not in the merged weights")
    for key, (indices, tensor) in expected["rows"].items():
        if key not in state or not torch.equal(state[key][indices], tensor.to(state[key].dtype)):
            raise MergeError(f"the trained rows of {key} from {adapter} are not in the merged weights")

    if native_family(merged) is not None:
        # transformers' classes may store weights under other names than their attributes (LLaVA keeps
        # its pre-v4.52 `language_model.model.*` keys on disk): name them as save_pretrained would.
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(merged, state)
    if layout is None:
        return state
    ignorable = [re.compile(p) for p in getattr(type(merged), "_keys_to_ignore_on_load_unexpected", None) or []]
    base_keys = layout.keys()
    extra = sorted(set(state) - set(base_keys))
    absent = [k for k in base_keys if k not in state and not any(p.search(k) for p in ignorable)]
    if extra or absent:
        raise MergeError(f"the merged weights do not match {base}'s parameter names; "
                         f"not in the base: {extra[:10]}; not in the merged model: {absent[:10]}")
    for key in base_keys:
        if key not in state:
            # A tensor the released checkpoint stores but the model recomputes (2.5/2.6's
            # resampler.pos_embed): written back unchanged so the names stay exactly the base's.
            with safe_open(base / layout.file_of(key), framework="pt") as handle:
                state[key] = handle.get_tensor(key)
    return {key: state[key] for key in base_keys}


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _write_weights(target: Path, state: dict, layout: _Layout, dtypes: dict[str, torch.dtype]) -> None:
    weight_map, total = {}, 0
    for name, keys in layout.shards.items():
        tensors = {}
        for key in keys:
            # copy: safetensors refuses tensors that share storage (tied or viewed weights).
            tensors[key] = state[key].detach().to(dtype=dtypes[key], copy=True).contiguous()
            total += tensors[key].numel() * tensors[key].element_size()
            weight_map[key] = name
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        _fsync(target / name)
        del tensors
    if layout.indexed:
        _write_json(target / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _write_config(target: Path, base: Path, out_dtype: torch.dtype | None) -> None:
    if out_dtype is None:
        _copy(base / "config.json", target / "config.json")
        return
    config = read_config(base)
    fields = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    for key in fields:
        config[key] = _dtype_name(out_dtype)
    _write_json(target / "config.json", config)


def _copy_side_files(target: Path, base: Path, tokenizer_source: Path) -> None:
    for name in BASE_SIDE_FILES + TOKENIZER_FILES:
        if (base / name).is_file():
            _copy(base / name, target / name)
    for path in sorted(base.glob("*.py")):  # the remote code config.json's auto_map names
        _copy(path, target / path.name)
    if tokenizer_source != base:
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                _copy(tokenizer_source / name, target / name)


def _publish(staging: Path, out: Path) -> None:
    """Moves the finished staging directory to `out`; an earlier merge there is replaced."""
    _fsync(staging)
    if out.is_dir() and any(out.iterdir()):
        # Two renames (POSIX cannot swap directories atomically); only a kill between them leaves
        # no MERGED_DIR, with the earlier merge in the hidden `.NAME.replaced-*` sibling.
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.replace(staging, out)  # onto a missing or empty directory
    _fsync(out.parent)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
    _fsync(path)


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    _fsync(target)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def merge_main(argv: list[str]) -> int:
    """`finetune merge`: returns the exit status (0, or 2 with a message on stderr for bad input)."""
    parser = argparse.ArgumentParser(
        prog="finetune merge",
        description="Fold a LoRA adapter (and the parts trained with it) into a standalone model directory.",
    )
    parser.add_argument("--base", default=None,
                        help="the model the adapter was trained on (default: the base recorded in the adapter)")
    parser.add_argument("--adapter", required=True, help="output_dir (or a checkpoint-N) of a --use_lora run")
    parser.add_argument("--out", required=True,
                        help="new, empty, or an earlier merge's directory (which is replaced)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the written weights (default: the base checkpoint's)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        base = args.base or _recorded_base(Path(args.adapter))
        out = merge_adapter(base, args.adapter, args.out, dtype=args.dtype)
    except (CheckpointError, UnsupportedModelError) as error:  # MergeError is a CheckpointError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _recorded_base(adapter: Path) -> str:
    config_file = adapter / "adapter_config.json"
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path") if config_file.is_file() else None
    if not recorded:
        _check_adapter_dir(adapter)  # says what is wrong with the adapter directory, if anything
        raise MergeError(f"{adapter} records no base model; pass --base")
    return recorded


__all__ = ["MERGE_INFO", "MergeError", "merge_adapter", "merge_main"]
