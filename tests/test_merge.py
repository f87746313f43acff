"""`finetune merge` on tiny models: the merged directory gives adapter-on-base logits and keeps the base's layout.

Each family's adapter is built through `apply_tuning` (the training path) with every trained tensor
moved off its initial value (LoRA's B starts at zero), so the merge has something to fold in:
2.0 trains LoRA + resampler + full embeddings, 2.5 LoRA + vision + resampler + the new tokens' rows,
2.6 LoRA on the language model and the vision encoder + resampler.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.data.collator import MiniCPMVCollator
from finetune.data.dataset import DataSettings, SampleEncoder
from finetune.models.config import detect_family
from finetune.models.loading import load_model, read_config
from finetune.models.tokenizer import load_tokenizer, special_token_ids
from finetune.train import merge as merge_module
from finetune.train.args import TuningArguments
from finetune.train.merge import MERGE_INFO, MergeError, merge_adapter, merge_main
from finetune.train.trainable import added_token_ids, apply_tuning

# family -> what the adapter trains besides LoRA on the language model's attention
CASES = {
    "2.0": {"tune_embeddings": "full", "tune_resampler": True},
    "2.5": {"tune_vision": True, "tune_resampler": True, "tune_embeddings": "new_tokens"},
    "2.6": {"lora_on_vision": True},  # the resampler as released (LoRA's default)
}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _make_adapter(base: Path, out: Path, tuning: dict, *, save_tokenizer: bool) -> Path:
    tokenizer = load_tokenizer(base)
    args = TuningArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, **tuning)
    model = apply_tuning(load_model(base), args, special_token_ids(tokenizer))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # LoRA A/B, modules_to_save copies, token rows
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    if save_tokenizer:
        tokenizer.save_pretrained(out)
    return out


def _batch(base: Path) -> dict[str, torch.Tensor]:
    """Two samples through the training data path: one with a sliced image, one text only."""
    tokenizer = load_tokenizer(base)
    tokens = special_token_ids(tokenizer)
    config = read_config(base)
    family = detect_family(config)
    # scale_resolution 224 (the released 448 would do too): a quarter of the patches, same code path.
    settings = DataSettings(family, config["query_num"], max_slice_nums=2, model_max_length=2048, scale_resolution=224)
    encoder = SampleEncoder(settings, tokenizer, tokens)
    pixels = (torch.rand(300, 450, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    with_image = {"messages": [{"role": "user", "content": "<image_00>\nWhat is it?"},
                               {"role": "assistant", "content": "A thing."}]}
    text_only = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}
    batch = MiniCPMVCollator(tokens.pad, config["query_num"])(
        [encoder.encode(with_image, [image]), encoder.encode(text_only, [])]
    )
    assert batch["pixel_values"].shape[0] > 1  # the image is sliced: source + grid slices
    del batch["labels"]  # with labels the model returns only the loss
    return batch


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def merged(request, tmp_path_factory):
    """(family, base dir, adapter dir, merged dir) per family, merged once per module."""
    family = request.param
    base = request.getfixturevalue(f"tiny_v{family.replace('.', '_')}_dir")
    work = tmp_path_factory.mktemp(f"merge-{family}")
    adapter = _make_adapter(base, work / "adapter", CASES[family], save_tokenizer=family == "2.5")
    out = merge_adapter(base, adapter, work / "merged")
    return family, base, adapter, out


def test_merged_logits_equal_adapter_on_base(merged):
    family, base, adapter, out = merged
    batch = _batch(base)
    reference = _logits(PeftModel.from_pretrained(load_model(base), adapter), batch)
    result = _logits(load_model(out), batch)
    torch.testing.assert_close(result, reference, rtol=0, atol=1e-5)
    # ... and the merge changed something the batch sees.
    assert (result - _logits(load_model(base), batch)).abs().max() > 1e-2


def test_merged_directory_keeps_the_base_layout(merged):
    family, base, adapter, out = merged
    base_weights, merged_weights = _weights(base), _weights(out)
    assert list(merged_weights) == list(base_weights)  # exactly the base's names, nothing from peft
    assert all(merged_weights[k].dtype == base_weights[k].dtype for k in base_weights)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (out / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    # The 2.5 adapter carries the training tokenizer, re-saved by transformers 5; it is the same
    # tokenizer, so the base's files are kept as released.
    tokenizer_files = sorted(p.name for p in base.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    assert tokenizer_files
    for name in tokenizer_files:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    info = json.loads((out / MERGE_INFO).read_text())
    assert info["tokenizer_from"] == "base"
    assert info["base"] == str(base.resolve()) and info["adapter"] == str(adapter.resolve())
    assert info["family"] == family and info["dtype"] is None and info["weights_dtypes"] == ["float32"]
    assert {"torch", "transformers", "peft"} <= set(info["versions"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_trained_parts_are_in_the_merged_weights(merged):
    """LoRA changed the attention projections; the modules_to_save copies and token rows replaced
    the base's; everything else is the base's, bit for bit."""
    family, base, adapter, out = merged
    base_weights, merged_weights = _weights(base), _weights(out)
    changed = {k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])}

    def attention_weights(part: str) -> set[str]:
        return {k for k in base_weights if k.startswith(part) and ".self_attn." in k and k.endswith("proj.weight")}

    expected = attention_weights("llm.")
    if CASES[family].get("tune_resampler"):
        expected |= {k for k in base_weights if k.startswith("resampler.") and not k.endswith("pos_embed")}
    if family == "2.0":
        expected.add("llm.model.embed_tokens.weight")
    if family == "2.5":
        expected |= {k for k in base_weights if k.startswith("vpm.") and "position_ids" not in k}
        rows = added_token_ids(special_token_ids(load_tokenizer(base)))
        embed = "llm.model.embed_tokens.weight"
        expected.add(embed)
        other = torch.ones(base_weights[embed].shape[0], dtype=torch.bool)
        other[rows] = False
        assert torch.equal(merged_weights[embed][other], base_weights[embed][other])
        assert not torch.equal(merged_weights[embed][rows], base_weights[embed][rows])
    if family == "2.6":  # LoRA on the vision encoder's attention
        expected |= attention_weights("vpm.")
    assert changed == expected


def test_merging_again_gives_the_same_directory(merged, tmp_path):
    family, base, adapter, out = merged
    before = _file_hashes(out)
    assert merge_adapter(base, adapter, out) == out.resolve()  # replaces the earlier merge in place
    assert _file_hashes(out) == before
    assert _file_hashes(merge_adapter(base, adapter, tmp_path / "again")) == before


def test_lora_on_lm_head_merges(tiny_v2_5_dir, tmp_path):
    """LoRA on lm_head (the smoke demo's targets) makes peft save lm_head's frozen base weight in the
    adapter (save_embedding_layers); that is no trained copy: the merge folds the LoRA delta into it."""
    targets = r"llm\.(lm_head|model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj)"
    adapter = _make_adapter(tiny_v2_5_dir, tmp_path / "adapter", {"lora_target_modules": targets},
                            save_tokenizer=False)
    out = merge_adapter(tiny_v2_5_dir, adapter, tmp_path / "merged")
    batch = _batch(tiny_v2_5_dir)
    reference = _logits(PeftModel.from_pretrained(load_model(tiny_v2_5_dir), adapter), batch)
    torch.testing.assert_close(_logits(load_model(out), batch), reference, rtol=0, atol=1e-5)


def test_dtype_changes_weights_and_config_only(tiny_v2_5_dir, tmp_path):
    adapter = _make_adapter(tiny_v2_5_dir, tmp_path / "adapter", {}, save_tokenizer=False)
    out = merge_adapter(tiny_v2_5_dir, adapter, tmp_path / "bf16", dtype="bfloat16")
    config, base_config = read_config(out), read_config(tiny_v2_5_dir)
    assert config.pop("torch_dtype") == "bfloat16"
    base_config.pop("torch_dtype")
    assert config == base_config
    assert {t.dtype for t in _weights(out).values()} == {torch.bfloat16}
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert json.loads((out / MERGE_INFO).read_text())["dtype"] == "bfloat16"


def _released_like(tiny: Path, out: Path) -> Path:
    """`tiny` laid out like a released checkpoint: bfloat16, two shards with an index, and the
    resampler.pos_embed table the released 2.5/2.6 files store but the model recomputes."""
    out.mkdir()
    weights = {key: tensor.to(torch.bfloat16) for key, tensor in _weights(tiny).items()}
    weights["resampler.pos_embed"] = torch.randn(7, 7, weights["resampler.query"].shape[1]).to(torch.bfloat16)
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({key: weights[key] for key in shard_keys}, str(out / name), metadata={"format": "pt"})
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = read_config(tiny)
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in tiny.iterdir():
        if path.name != "config.json" and not path.name.startswith("model"):
            shutil.copy(path, out / path.name)
    return out


def test_released_like_base_keeps_shards_dtype_and_stored_tables(tiny_v2_5_dir, tmp_path):
    base = _released_like(tiny_v2_5_dir, tmp_path / "base")
    adapter = _make_adapter(base, tmp_path / "adapter", {}, save_tokenizer=False)
    out = merge_adapter(base, adapter, tmp_path / "merged")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for name in set(index["weight_map"].values()):
        with safe_open(base / name, framework="pt") as before, safe_open(out / name, framework="pt") as after:
            assert sorted(before.keys()) == sorted(after.keys())
            assert {after.get_tensor(k).dtype for k in after.keys()} == {torch.bfloat16}
            if "resampler.pos_embed" in before.keys():
                assert torch.equal(after.get_tensor("resampler.pos_embed"), before.get_tensor("resampler.pos_embed"))
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()

    # --dtype float32 merges at float32: the bfloat16 weights plus the exact LoRA product.
    out32 = merge_adapter(base, adapter, tmp_path / "merged32", dtype=torch.float32)
    batch = _batch(base)
    reference = _logits(PeftModel.from_pretrained(load_model(base, dtype=torch.float32), adapter), batch)
    torch.testing.assert_close(_logits(load_model(out32), batch), reference, rtol=0, atol=1e-5)


def test_failed_write_leaves_earlier_output_untouched(tiny_v2_5_dir, tmp_path, monkeypatch):
    adapter = _make_adapter(tiny_v2_5_dir, tmp_path / "adapter", {}, save_tokenizer=False)
    out = merge_adapter(tiny_v2_5_dir, adapter, tmp_path / "merged")
    before = _file_hashes(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the shards are written

    monkeypatch.setattr(merge_module, "_write_config", crash)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(tiny_v2_5_dir, adapter, out)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(tiny_v2_5_dir, adapter, tmp_path / "fresh")
    assert _file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no staging, no "fresh"


def test_a_changed_tokenizer_comes_from_the_adapter(tiny_v2_6_dir, tmp_path):
    adapter = _make_adapter(tiny_v2_6_dir, tmp_path / "adapter", {}, save_tokenizer=True)
    tokenizer = load_tokenizer(adapter)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(adapter)
    out = merge_adapter(tiny_v2_6_dir, adapter, tmp_path / "merged")
    assert json.loads((out / MERGE_INFO).read_text())["tokenizer_from"] == "adapter"
    assert load_tokenizer(out).chat_template == tokenizer.chat_template
    assert load_tokenizer(out).get_vocab() == load_tokenizer(tiny_v2_6_dir).get_vocab()


def test_refuses_foreign_or_source_output_dirs(tiny_v2_5_dir, tmp_path):
    adapter = _make_adapter(tiny_v2_5_dir, tmp_path / "adapter", {}, save_tokenizer=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(MergeError, match="holds no earlier merge"):
        merge_adapter(tiny_v2_5_dir, adapter, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    for source in (tiny_v2_5_dir, adapter):
        with pytest.raises(MergeError, match="would replace"):
            merge_adapter(tiny_v2_5_dir, adapter, source)


def test_cli_merges_and_reports_bad_input(tiny_v2_0_dir, tiny_v2_5_dir, tmp_path, capsys):
    adapter = _make_adapter(tiny_v2_5_dir, tmp_path / "adapter", {}, save_tokenizer=False)
    assert merge_main(["--base", str(tiny_v2_5_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "m").resolve())
    assert merge_main(["--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 0  # base from the adapter

    # A 2.5 adapter without its family records, so only the shapes can tell (2.0's k_proj is wider).
    anonymous = tmp_path / "anonymous"
    shutil.copytree(adapter, anonymous)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    config.pop("auto_mapping")
    (anonymous / "adapter_config.json").write_text(json.dumps(config))

    cases = [
        (["--base", str(tmp_path / "nowhere"), "--adapter", str(adapter)], "does not exist"),
        (["--base", str(tiny_v2_5_dir), "--adapter", str(tmp_path / "nowhere")], "does not exist"),
        (["--base", str(tiny_v2_5_dir), "--adapter", str(tiny_v2_5_dir)], "load it with load_model"),
        (["--base", str(tiny_v2_0_dir), "--adapter", str(adapter)], "trained on a MiniCPM-V 2.5"),
        (["--base", str(tiny_v2_0_dir), "--adapter", str(anonymous)], "does not fit the base"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert merge_main([*argv, "--out", str(tmp_path / "bad")]) == 2
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        error = next(line for line in stderr.splitlines() if line.startswith("error: "))
        assert message in stderr[stderr.index(error):], stderr
        assert not (tmp_path / "bad").exists()
