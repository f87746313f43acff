"""The transformers-native families on tiny random models: llava (the Llama3-V shape) and MiniCPM-V 4.6.

make-tiny output loads through `load_model` and `AutoProcessor`; the data path gives exactly the
processor's own token ids and pixels, with assistant-only labels; the tuning flags pick each class's
parts; merge folds an adapter in; and (slow) both fine-tune, resume and merge through the same
commands as the 2.x families on 2 CPU ranks (ZeRO-2; llava fully and 4.6 with LoRA also under ZeRO-3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from PIL import Image
from safetensors import safe_open

from finetune.data.dataset import DataSettings
from finetune.data.hf_native import NativeSampleEncoder
from finetune.data.templates import IGNORE_INDEX
from finetune.models.config import detect_family
from finetune.models.hf_native import MODEL_CLASS_NAMES, load_processor, model_class
from finetune.models.loading import build_model, load_model, read_config
from finetune.models.minicpmv import LOSS_CHUNKS
from finetune.train.args import TuningArguments
from finetune.train.checkpoints import COMPLETE_MARKER
from finetune.train.merge import merge_adapter
from finetune.train.trainable import apply_tuning

from test_train import SAMPLE, _command, _env, _final_losses, _losses, _mean, _run

REPO = Path(__file__).parents[1]
FAMILIES = ("llava", "4.6")
# Tiny random models learn visibly only with LoRA on lm_head and the MLPs too (see test_train.py).
TINY_NATIVE_LORA = [
    "--use_lora", "true", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0",
    "--lora_target_modules",
    r"(lm_head|model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj)))",
]


@pytest.fixture
def tiny_dirs(tiny_model_dir) -> dict[str, Path]:
    return {family: tiny_model_dir(family) for family in FAMILIES}


def _encoder(model_dir: Path, family: str, **settings) -> NativeSampleEncoder:
    values = {"max_slice_nums": 2, "model_max_length": 2048, **settings}
    return NativeSampleEncoder.from_pretrained(model_dir, DataSettings(family, 0, **values))


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _record(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)]}


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_make_tiny_output_loads_offline(family, tiny_dirs, tmp_path):
    directory = tiny_dirs[family]
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processor_config.json"} <= names
    assert detect_family(read_config(directory)) == family

    model = load_model(directory)
    assert type(model).__name__ == MODEL_CLASS_NAMES[family]
    assert type(build_model(directory)).__name__ == MODEL_CLASS_NAMES[family]  # meta device, no weights
    processor = load_processor(directory, family)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == processor.image_token

    # The CLI writes the same directory.
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "finetune", "make-tiny", "--family", family, "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(out / "model.safetensors", "pt") as new, safe_open(directory / "model.safetensors", "pt") as old:
        assert sorted(new.keys()) == sorted(old.keys())
        assert all(torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in old.keys())


# ---------------------------------------------------------------------------------------------------
# Data: the processor's placeholders and pixels, ChatEncoder's labels and truncation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_matches_the_processor(family, tiny_dirs):
    """Token ids and pixels are exactly what the processor makes of the rendered chat; only the
    answer and its end-of-turn token are labelled."""
    encoder = _encoder(tiny_dirs[family], family)
    processor = encoder.processor
    image = _image(600, 400)
    sample = encoder.encode(_record("<image_00>\nWhat is it?", "A thing."), [image])

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
            {"role": "assistant", "content": "A thing."}]
    text = processor.apply_chat_template(chat, tokenize=False)
    reference = processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt",
                          **({"max_slice_nums": 2} if family == "4.6" else {}))
    assert sample["input_ids"].tolist() == reference["input_ids"][0].tolist()
    if family == "llava":
        assert torch.equal(sample["pixel_values"], reference["pixel_values"])
    else:
        assert torch.equal(sample["pixel_values"], reference["pixel_values"][0])
        assert torch.equal(sample["target_sizes"], reference["target_sizes"])
        assert len(sample["target_sizes"]) == 3  # 600 x 400 with max_slice_nums 2: source + 2 slices

    trained = [t for t in sample["labels"].tolist() if t != IGNORE_INDEX]
    eot = "<|eot_id|>" if family == "llava" else "<|im_end|>"
    assert processor.tokenizer.decode(trained) == f"A thing.{eot}"
    assert (sample["input_ids"] == processor.image_token_id).sum() > 0
    assert (sample["labels"] == processor.image_token_id).sum() == 0


@pytest.mark.parametrize("size", [(600, 400), (400, 600), (1000, 300), (100, 80), (1600, 1200), (448, 448)])
@pytest.mark.parametrize("max_slice_nums", [2, 9])
def test_minicpmv4_6_layout_from_size_matches_processing(size, max_slice_nums, tiny_dirs):
    """check-data measures placeholders from image sizes alone; training processes the pixels."""
    encoder = _encoder(tiny_dirs["4.6"], "4.6", max_slice_nums=max_slice_nums)
    processed = encoder._process([Image.new("RGB", size)])
    assert encoder.layout(*size) == encoder._layouts(processed, 1)[0]


def test_truncation_drops_the_images_of_dropped_exchanges(tiny_dirs):
    for family in FAMILIES:
        full = _encoder(tiny_dirs[family], family)
        record = _record("<image_00>\nFirst?", "One.", "<image_01>\nSecond?", "Two.")
        images = [_image(600, 400, seed=1), _image(300, 500, seed=2)]
        both = full.encode(record, images)
        first_only = full.encode(_record("<image_00>\nFirst?", "One."), images[:1])

        short = _encoder(tiny_dirs[family], family, model_max_length=len(first_only["input_ids"]) + 4)
        truncated = short.encode(record, images)
        assert truncated["input_ids"].tolist() == first_only["input_ids"].tolist()
        for key in first_only.keys() - {"input_ids"}:
            assert torch.equal(truncated[key], first_only[key]), key
        assert len(both["input_ids"]) > len(truncated["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_check_data_measures_what_training_encodes(family, tiny_dirs):
    from finetune.data.check import check_data
    from finetune.data.images import open_image

    encoder = _encoder(tiny_dirs[family], family)
    report = check_data(str(SAMPLE / "train.json"), encoder)
    assert not report.errors and len(report.lengths) == len(report.records)
    for record, length in zip(report.records, report.lengths):
        sample = encoder.encode(record, [open_image(image["path"]) for image in record["images"]])
        assert len(sample["input_ids"]) == length, record["id"]


@pytest.mark.parametrize("family", FAMILIES)
def test_collated_batch_trains(family, tiny_dirs):
    """A batch with images and a text-only sample gives a finite loss, and (with --tune_vision) a
    text-only batch still reaches the vision tower, as ZeRO-3 and DDP need."""
    encoder = _encoder(tiny_dirs[family], family)
    samples = [encoder.encode(_record("<image_00>\nWhat is it?", "A thing."), [_image(500, 300)]),
               encoder.encode(_record("hello there", "hi"), [])]
    batch = encoder.collator()(samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][1, len(samples[1]["input_ids"]):].eq(encoder.tokens.pad).all()
    assert batch["labels"][1, len(samples[1]["labels"]):].eq(IGNORE_INDEX).all()
    if family == "llava":
        assert batch["pixel_values"].shape == (1, 3, 224, 224)
    else:
        assert batch["pixel_values"].shape[:3] == (1, 3, 14) and batch["target_sizes"].dtype == torch.int32

    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(tune_vision=True, tune_resampler=True),
                         encoder.tokens)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)

    model.zero_grad()
    text_only = encoder.collator()([samples[1]])
    assert "pixel_values" not in text_only
    model(**text_only).loss.backward()
    patch_embedding = model.model.vision_tower.embeddings.patch_embedding.weight
    projector = model.model.multi_modal_projector if family == "llava" else model.model.merger
    assert patch_embedding.grad is not None and all(p.grad is not None for p in projector.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_the_class_loss_from_supervised_logits_only(family, tiny_dirs):
    """The loss equals cross-entropy over the class's own logits, but lm_head sees only supervised
    positions, in LOSS_CHUNKS chunks (plus the class's own call: llava with no position kept)."""
    encoder = _encoder(tiny_dirs[family], family)
    samples = [encoder.encode(_record("<image_00>\nWhat is it?", "A thing, seen from above."), [_image(500, 300)]),
               encoder.encode(_record("hello there", "hi"), [])]
    batch = encoder.collator()(samples)
    labels = batch.pop("labels")
    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(use_lora=True, lora_r=4), encoder.tokens)
    model.eval()
    rows = []
    handle = model.get_base_model().lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1]))
    try:
        with torch.no_grad():
            output = model(**batch, labels=labels)
            logits = model(**batch).logits.float()
    finally:
        handle.remove()
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    class_call, *chunks = rows[: 1 + LOSS_CHUNKS]
    assert class_call[-1] == (0 if family == "llava" else labels.shape[1])
    assert len(chunks) == LOSS_CHUNKS and sum(c.numel() for c in chunks) == supervised
    assert output.logits is None
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_module_calls_do_not_depend_on_the_images(family, tiny_dirs):
    """ZeRO-3 gathers parameters per module call and hooks every output tensor, in the same order on
    every rank: a training step makes the same calls, vision first, and 4.6's merger returns one
    tensor, whether the batch has images, how many slices they have, or none at all."""
    encoder = _encoder(tiny_dirs[family], family)
    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(tune_vision=True, tune_llm=True),
                         encoder.tokens)
    model.train()
    calls: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        module.register_forward_hook(
            lambda m, args, out, name=name: calls.append((name, len(out) if isinstance(out, (list, tuple)) else 1)))
    batches = [
        [encoder.encode(_record("<image_00>\nWhat?", "A."), [_image(900, 300)]),
         encoder.encode(_record("<image_00>\nAnd?", "B."), [_image(300, 300, seed=1)])],
        [encoder.encode(_record("<image_00>\nWhat?", "A."), [_image(500, 400)]),
         encoder.encode(_record("hi", "yo"), [])],
        [encoder.encode(_record("hi", "yo"), []), encoder.encode(_record("hello", "hey"), [])],
    ]
    sequences = []
    for batch in batches:
        calls.clear()
        model(**encoder.collator()(batch)).loss.backward()
        sequences.append(list(calls))
    assert sequences[0] == sequences[1] == sequences[2]
    names = [name for name, _ in sequences[0]]
    assert names.index("model.vision_tower") < names.index("model.language_model")
    if family == "4.6":
        assert ("model.merger", 1) in sequences[0]


def test_batched_merger_gives_the_class_features(tiny_dirs):
    from transformers import MiniCPMV4_6Config
    from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6Merger

    raw = read_config(tiny_dirs["4.6"])
    for merger_times in (1, 2):
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
        config = MiniCPMV4_6Config(**{**fields, "merger_times": merger_times})
        torch.manual_seed(0)
        reference = MiniCPMV4_6Merger(config)
        batched = type(load_model(tiny_dirs["4.6"]).model.merger)(config)
        batched.load_state_dict(reference.state_dict())
        sizes = torch.tensor([[8, 8], [4, 12], [16, 4]], dtype=torch.int32)
        hidden = torch.randn(1, int(sizes.prod(-1).sum()), config.vision_config.hidden_size)
        (features,) = batched(hidden, sizes)
        torch.testing.assert_close(features, torch.cat(reference(hidden, sizes)))


# ---------------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------------

# family -> flags -> prefixes of the trainable parameters (peft's "base_model.model." stripped)
PART_CASES = {
    "llava": {
        "vision": ("model.vision_tower.",),
        "resampler": ("model.multi_modal_projector.",),
        "llm": ("model.language_model.", "lm_head."),
    },
    "4.6": {
        "vision": ("model.vision_tower.",),
        "resampler": ("model.merger.",),
        "llm": ("model.language_model.", "lm_head."),
    },
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", ["vision", "resampler", "llm"])
def test_tune_flags_train_their_part(family, part, tiny_dirs):
    flags = {"tune_vision": part == "vision", "tune_resampler": part == "resampler", "tune_llm": part == "llm"}
    tokens = _encoder(tiny_dirs[family], family).tokens
    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(**flags), tokens)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    prefixes = PART_CASES[family][part]
    assert names and all(name.startswith(prefixes) for name in names)
    expected = {name for name, _ in model.named_parameters() if name.startswith(prefixes)}
    assert names == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_defaults_target_language_model_attention(family, tiny_dirs):
    tokens = _encoder(tiny_dirs[family], family).tokens
    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(use_lora=True, lora_r=4), tokens)
    wrapped = sorted(name.removeprefix("base_model.model.model.language_model.").removesuffix(".lora_A.default")
                     for name, _ in model.named_modules() if name.endswith("lora_A.default"))
    if family == "llava":
        assert wrapped == [f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "koqv"]
    else:  # Qwen3.5: a gated-delta-net layer, then a full-attention layer
        assert wrapped == ["layers.0.linear_attn.in_proj_qkv", "layers.0.linear_attn.in_proj_z",
                           "layers.0.linear_attn.out_proj"] + [f"layers.1.self_attn.{p}_proj" for p in "koqv"]
    # LoRA alone trains the adapters only; --tune_resampler true adds the projector / merger, whole.
    assert not [name for name, _ in model.named_modules() if ".modules_to_save" in name]
    model = apply_tuning(load_model(tiny_dirs[family]), TuningArguments(use_lora=True, lora_r=4, tune_resampler=True),
                         tokens)
    saved = {name.split(".modules_to_save")[0] for name, _ in model.named_modules() if ".modules_to_save" in name}
    assert saved == {"base_model.model." + PART_CASES[family]["resampler"][0].rstrip(".")}

    with_vision = apply_tuning(load_model(tiny_dirs[family]),
                               TuningArguments(use_lora=True, lora_r=4, lora_on_vision=True), tokens)
    vision = [name for name, _ in with_vision.named_modules()
              if name.endswith("lora_A.default") and ".vision_tower." in name]
    assert len(vision) == 4 * (2 if family == "llava" else 3)  # q, k, v, out per layer (4.6: + window merger)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_gives_adapter_on_base_logits(family, tiny_dirs, tmp_path):
    base = tiny_dirs[family]
    encoder = _encoder(base, family)
    model = apply_tuning(load_model(base), TuningArguments(use_lora=True, lora_r=4, tune_vision=True), encoder.tokens)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # LoRA's B starts at zero: give the merge something to fold in
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")

    merged_dir = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    with safe_open(merged_dir / "model.safetensors", "pt") as merged, safe_open(base / "model.safetensors", "pt") as b:
        assert sorted(merged.keys()) == sorted(b.keys())  # the base's checkpoint names
    assert load_processor(merged_dir, family).image_token == encoder.processor.image_token

    batch = encoder.collator()([encoder.encode(_record("<image_00>\nWhat is it?", "A thing."), [_image(500, 300)])])
    del batch["labels"]  # with labels the model returns only the loss
    reference = PeftModel.from_pretrained(load_model(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = reference(**batch).logits
        got = load_model(merged_dir).eval()(**batch).logits
        unchanged = load_model(base).eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, unchanged, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompts_as_the_processor_and_answers_as_generate(family, tiny_dirs):
    """`Chat` builds the prompt the processor builds for the chat template's generation prompt and
    answers with the model's own greedy `generate`; a left-padded batch answers as each prompt alone."""
    from finetune.generate import Chat

    chat = Chat(tiny_dirs[family], max_slice_nums=2)
    processor, image = chat.encoder.processor, _image(600, 400)
    prompt = chat.prompt([{"role": "user", "content": "What is it?", "images": [image]}])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]}],
        tokenize=False, add_generation_prompt=True)
    reference = processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt",
                          **({"max_slice_nums": 2} if family == "4.6" else {}))
    assert prompt["input_ids"].tolist() == reference["input_ids"][0].tolist()

    with torch.no_grad():
        generated = chat.model.generate(**reference, max_new_tokens=5, do_sample=False,
                                        eos_token_id=list(chat.tokens.stop_ids), pad_token_id=chat.tokens.pad)
    expected = generated[0, reference["input_ids"].shape[1]:].tolist()
    expected = expected[:next((i for i, t in enumerate(expected) if t in chat.tokens.stop_ids), len(expected))]
    answer = chat.ask("What is it?", images=[image], max_new_tokens=5)
    assert answer == chat.decode(expected)
    text_only = chat.ask("Hello there, how are you today?", max_new_tokens=5)
    assert chat.generate_batch([[{"role": "user", "content": "What is it?", "images": [image]}],
                                [{"role": "user", "content": "Hello there, how are you today?"}]],
                               max_new_tokens=5) == [answer, text_only]


# ---------------------------------------------------------------------------------------------------
# End to end: 2 CPU ranks under each DeepSpeed profile
# ---------------------------------------------------------------------------------------------------


def _native_command(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return _command(model_dir, output_dir, "--learning_rate", "1e-2", *extra)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "mode", "profile"), [
    ("llava", "lora", "zero2.json"), ("4.6", "lora", "zero2.json"),
    ("llava", "full", "zero3.json"), ("4.6", "lora", "zero3.json"),
    # The offload profiles: DeepSpeed's CPU Adam steps the optimizer on the host.
    ("llava", "lora", "zero2_offload.json"), ("4.6", "lora", "zero3_offload.json"),
])
def test_native_training_learns_the_sample_set(family, mode, profile, tiny_dirs, tmp_path):
    steps = 16
    out = tmp_path / "run"
    if mode == "lora":
        extra = [*TINY_NATIVE_LORA, "--learning_rate", "1e-2"]
    else:
        extra = ["--tune_llm", "true", "--tune_vision", "true", "--learning_rate", "2e-3"]
    _run(_command(tiny_dirs[family], out, *extra, "--max_steps", str(steps), "--save_steps", str(steps),
                  profile=profile))
    losses = _final_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = _mean(losses[s] for s in range(1, 5)), _mean(losses[s] for s in range(steps - 3, steps + 1))
    assert last < 0.85 * first, f"loss did not fall clearly: {losses}"
    if mode == "lora":
        model = PeftModel.from_pretrained(load_model(tiny_dirs[family]), out)
        assert any("lora_B" in name for name, _ in model.named_parameters())
    else:  # gathered from the ZeRO-3 partitions: every weight loads by name (load_model checks), trained
        trained, base = load_model(out), load_model(tiny_dirs[family])
        assert type(trained).__name__ == MODEL_CLASS_NAMES[family]
        for part in ("model.language_model.layers.0", "model.vision_tower.encoder.layers.0"):
            assert not torch.equal(*(next(m.get_submodule(part).parameters()) for m in (trained, base))), part
        # The output names its weights as the base does (llava: `language_model.model.*`, `vision_tower.*`),
        # and plain transformers loads exactly DeepSpeed's trained (fp32 master) weights from it.
        with safe_open(out / "model.safetensors", "pt") as saved, \
                safe_open(tiny_dirs[family] / "model.safetensors", "pt") as original:
            assert sorted(saved.keys()) == sorted(original.keys())
        plain, info = model_class(family).from_pretrained(out, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        master = get_fp32_state_dict_from_zero_checkpoint(out / f"checkpoint-{steps}")
        loaded = plain.state_dict()
        assert sorted(loaded) == sorted(master)
        assert all(torch.equal(loaded[name], master[name]) for name in master)
    assert load_processor(out, family).image_token  # the output keeps the base's processor files
    assert json.loads((out / "run_config.json").read_text())["arguments"]["family"] == family


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_native_resume_and_merge(family, tiny_dirs, tmp_path):
    """Default LoRA targets: a run resumed from its step-3 checkpoint ends where an unbroken one does,
    and `finetune merge` folds the adapter into a model that gives the adapter's logits."""
    base = tiny_dirs[family]
    args = ["--use_lora", "true", "--max_steps", "6", "--save_steps", "3"]
    unbroken = tmp_path / "unbroken"
    _run(_native_command(base, unbroken, *args))
    expected = _final_losses(unbroken)

    resumed = tmp_path / "resumed"
    shutil.copytree(unbroken, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    assert (resumed / "checkpoint-3" / COMPLETE_MARKER).exists()
    _run(_native_command(base, resumed, *args, "--resume_from_checkpoint", "auto"))
    got = _losses(resumed / "checkpoint-6" / "trainer_state.json")
    assert got[6] == pytest.approx(expected[6], rel=1e-4) and got[4] == pytest.approx(expected[4], rel=1e-4)

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "finetune", "merge", "--adapter", str(resumed), "--out", str(merged)],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    encoder = _encoder(base, family)
    batch = encoder.collator()([encoder.encode(_record("<image_00>\nWhat is it?", "A thing."), [_image(500, 300)])])
    with torch.no_grad():
        expected_logits = PeftModel.from_pretrained(load_model(base), resumed).eval()(**batch).logits
        got_logits = load_model(merged).eval()(**batch).logits
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-4, atol=1e-4)
