"""Native MiniCPM-V models: checkpoint layout, family detection, loading, forward/backward, loss and quirks.

Expected values are derived here from the spec (../shared/design/minicpmv-spec.md §1, §2) and from
plain PyTorch / transformers references, never from the implementation under test. Every model is
tiny (2 LLM layers, 128 wide; 2-3 vision layers, 64 wide) and built from the session fixtures in
conftest.py.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from finetune.models.config import UnsupportedModelError, detect_family
from finetune.models.loading import CheckpointError, build_model, load_model
from finetune.models.minicpm_llama3_v2_5 import MiniCPMLlama3V25
from finetune.models.minicpm_v2 import MiniCPMForCausalLM, MiniCPMV2
from finetune.models.minicpm_v2_6 import MiniCPMV26
from finetune.models.minicpmv import LOSS_CHUNKS, ImageTextMismatchError, normalize_pixels
from finetune.models.resampler import Resampler, sincos_1d, sincos_2d

P = 14  # patch size
FAMILIES = ("2.0", "2.5", "2.6")
EXPECTED_CLASS = {"2.0": MiniCPMV2, "2.5": MiniCPMLlama3V25, "2.6": MiniCPMV26}
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"  # the repo's parent holds shared/

# Arbitrary token ids for hand-built batches: the model never looks at the ids under an image bound.
PAD, UNK, IMAGE_START, IMAGE_END = 0, 3, 4, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _config_json(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Independent references


def ref_sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Spec §1.3: E1(p; d) = [sin(p*w_k) for k < d/2, cos(p*w_k) for k < d/2], w_k = 10000^(-k/(d/2))."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    omega = 10000.0 ** (-k / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def ref_sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Spec §1.3: entry [i, j] = concat(E1(j; D/2), E1(i; D/2)); [height, width, dim], float32."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    table = torch.cat([ref_sincos_1d(dim // 2, cols), ref_sincos_1d(dim // 2, rows)], dim=1)
    return table.reshape(height, width, dim).float()


def spec_bucket(k: int, n: int, side: int = 70) -> int:
    """Spec §1.2: bucketize k/n against boundaries {1/side, 2/side, ...} with right=True, exactly."""
    return sum(1 for m in range(1, side) if Fraction(m, side) <= Fraction(k, n))


def to_strip(image: torch.Tensor) -> torch.Tensor:
    """Spec §2.2 the slow way: [3, h*P, w*P] -> [3, P, h*w*P], patches row-major, side by side."""
    _, height, width = image.shape
    patches = [image[:, r : r + P, c : c + P] for r in range(0, height, P) for c in range(0, width, P)]
    return torch.cat(patches, dim=2)


def strip_batch(images: list[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strips [S, 3, P, L*P] of the images' dtype (zero-padded on the right) and tgt_sizes [S, 2]: the
    batch contract's pixel_values for uint8 images, the vision encoder's input for normalised ones."""
    strips = [to_strip(image) for image in images]
    longest = length if length is not None else max((s.shape[2] // P for s in strips), default=0)
    pixel_values = torch.zeros(len(strips), 3, P, longest * P, dtype=images[0].dtype if images else torch.uint8)
    for slot, strip in zip(pixel_values, strips):
        slot[:, :, : strip.shape[2]] = strip
    sizes = [(image.shape[1] // P, image.shape[2] // P) for image in images]
    return pixel_values, torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)


def random_image(height: int, width: int) -> torch.Tensor:
    """A normalised slice of height x width patches, values in [-1, 1]."""
    return torch.rand(3, height * P, width * P) * 2 - 1


def make_batch(config: dict, samples: list[tuple[int, list[tuple[int, int]]]], seed: int = 0) -> dict:
    """A batch in the layout of docs/architecture.md, built by hand.

    Args:
        samples: per sample, (number of leading text tokens, [(h, w) of each slice in patches]).
            Each slice is written as <image> + query_num placeholders + </image> + 3 text tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    query_num, vocab = config["query_num"], config["vocab_size"]

    def text(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=generator).tolist()

    rows, placeholder_rows, bounds, images = [], [], [], []
    for index, (n_text, sizes) in enumerate(samples):
        ids, placeholder = text(n_text), [False] * n_text
        for h, w in sizes:
            ids.append(IMAGE_START)
            bounds.append((index, len(ids), len(ids) + query_num))
            ids += [UNK] * query_num + [IMAGE_END] + text(3)
            placeholder += [False] + [True] * query_num + [False] * 4
            images.append(torch.randint(0, 256, (3, h * P, w * P), generator=generator, dtype=torch.uint8))
        rows.append(ids)
        placeholder_rows.append(placeholder)
    batch_size, length = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((batch_size, length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    position_ids = torch.zeros(batch_size, length, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    for b, (ids, placeholder) in enumerate(zip(rows, placeholder_rows)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
        supervised = ~torch.tensor(placeholder)
        supervised[0] = False
        labels[b, :n] = torch.where(supervised, torch.tensor(ids), torch.tensor(-100))
    pixel_values, tgt_sizes = strip_batch(images)
    pixel_values = pixel_values.permute(0, 2, 3, 1).contiguous()  # the contract's channels-last uint8
    for b, start, end in bounds:  # sanity of the helper itself
        assert input_ids[b, start - 1] == IMAGE_START and input_ids[b, end] == IMAGE_END
        assert bool((input_ids[b, start:end] == UNK).all())
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "tgt_sizes": tgt_sizes,
        "image_bound": torch.tensor(bounds, dtype=torch.long).reshape(-1, 3),
        "slice_counts": torch.tensor([len(sizes) for _, sizes in samples], dtype=torch.long),
    }


# Samples with 0, 1 and several slices, of several sizes and aspect ratios (2x3 appears twice, so
# 2.0's grouping of equal sizes is exercised too; 1x5 and 4x2 are wide and tall).
MIXED_SAMPLES = [(7, []), (3, [(2, 3)]), (2, [(4, 2), (1, 5), (3, 3), (2, 3)])]


@pytest.fixture
def load_tiny(tiny_model_dir):
    def load(family: str):
        directory = tiny_model_dir(family)
        return load_model(directory), _config_json(directory)

    return load


# ---------------------------------------------------------------------------------------------------
# 1. The released checkpoints' layout


REFERENCE_CASES = {
    # directory: (family, dtype the shards are stored in, shapes the spec states)
    "MiniCPM-V-2": (
        "2.0",
        torch.bfloat16,  # = config torch_dtype
        {
            "resampler.proj": (2304, 2304),
            "resampler.query": (64, 2304),
            "resampler.pos_embed": (64, 2304),
            "resampler.kv_proj.weight": (2304, 1152),
            "resampler.attn.in_proj_weight": (3 * 2304, 2304),
            "resampler.attn.in_proj_bias": (3 * 2304,),
            "resampler.attn.out_proj.weight": (2304, 2304),
            "resampler.ln_post.weight": (2304,),
            "vpm.pos_embed": (1, 729, 1152),
            "vpm.patch_embed.proj.weight": (1152, 3, 14, 14),
            "vpm.blocks.25.attn.qkv.weight": (3456, 1152),
            "vpm.blocks.0.mlp.fc1.weight": (4304, 1152),
            "llm.model.embed_tokens.weight": (122753, 2304),
            "llm.lm_head.weight": (122753, 2304),
            "llm.model.layers.39.mlp.gate_proj.weight": (5760, 2304),
        },
    ),
    "MiniCPM-Llama3-V-2_5": (
        "2.5",
        # The 2.5 shards hold float32 tensors although config.json says float16: the index's
        # total_size is exactly 4 bytes per parameter (34148369344 = 4 x 8537092336).
        torch.float32,
        {
            "resampler.proj": (4096, 4096),
            "resampler.query": (96, 4096),
            "resampler.kv_proj.weight": (4096, 1152),
            "resampler.attn.in_proj_weight": (3 * 4096, 4096),
            "vpm.embeddings.position_embedding.weight": (4900, 1152),
            "vpm.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
            "vpm.encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
            "vpm.encoder.layers.0.mlp.fc1.weight": (4304, 1152),
            "llm.model.layers.31.self_attn.k_proj.weight": (8 * 128, 4096),
            "llm.model.layers.0.mlp.gate_proj.weight": (14336, 4096),
            "llm.lm_head.weight": (128256, 4096),
        },
    ),
}


@pytest.mark.parametrize("directory", sorted(REFERENCE_CASES))
def test_meta_model_matches_released_checkpoint_index(directory):
    path = REFERENCE / directory
    if not (path / "model.safetensors.index.json").is_file():
        pytest.skip(f"reference files not found at {path} (../shared/reference beside the repo)")
    family, stored_dtype, shapes = REFERENCE_CASES[directory]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    config = json.loads((path / "config.json").read_text())

    model = build_model(path, device="meta")
    state = model.state_dict()

    assert model.config.family == family
    missing, extra = set(index["weight_map"]) - set(state), set(state) - set(index["weight_map"])
    assert not missing and not extra, f"missing from the model: {sorted(missing)[:5]}, extra: {sorted(extra)[:5]}"
    total_params = sum(t.numel() for t in state.values())
    assert total_params * stored_dtype.itemsize == index["metadata"]["total_size"]
    if family == "2.0":
        assert getattr(torch, config["torch_dtype"]) == stored_dtype
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    on_cpu = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not on_cpu, f"built outside the requested device: {on_cpu}"


# ---------------------------------------------------------------------------------------------------
# 2. Family detection


def test_family_detection_from_config_dicts():
    if not REFERENCE.is_dir():
        pytest.skip(f"reference files not found at {REFERENCE}")
    v2 = json.loads((REFERENCE / "MiniCPM-V-2" / "config.json").read_text())
    v25 = json.loads((REFERENCE / "MiniCPM-Llama3-V-2_5" / "config.json").read_text())
    assert detect_family(v2) == "2.0"
    assert detect_family(v25) == "2.5"
    # 2.6's config.json carries version as a number (2.6), 2.5's as a string.
    assert detect_family({**v25, "version": 2.6}) == "2.6"
    assert detect_family({**v25, "version": "2.6"}) == "2.6"

    with pytest.raises(UnsupportedModelError, match="qwen2_vl"):
        detect_family({**v25, "model_type": "qwen2_vl"})
    # Loaded through transformers' own classes (tests/test_hf_native.py).
    assert detect_family({"model_type": "llava"}) == "llava"
    assert detect_family({"model_type": "minicpmv4_6"}) == "4.6"
    with pytest.raises(UnsupportedModelError, match=r"4\.5"):
        detect_family({**v25, "version": "4.5"})
    with pytest.raises(UnsupportedModelError, match=r"4\.5"):
        build_model({**v25, "version": 4.5}, device="meta")
    without_version = {k: v for k, v in v25.items() if k != "version"}
    with pytest.raises(UnsupportedModelError):
        detect_family(without_version)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_detected_as_its_family(family, tiny_model_dir):
    assert detect_family(_config_json(tiny_model_dir(family))) == family


# ---------------------------------------------------------------------------------------------------
# 3. Save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tiny_model_dir, tmp_path):
    directory = tiny_model_dir(family)
    config = _config_json(directory)
    stored = load_file(directory / "model.safetensors")

    model = load_model(directory)
    assert type(model) is EXPECTED_CLASS[family]
    state = model.state_dict()
    assert set(state) == set(stored)
    for key, tensor in stored.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key

    if family != "2.0":
        # Not in the file: rebuilt on load, and must hold the real table (not meta, not garbage).
        table = model.resampler.pos_embed
        assert table.device.type == "cpu"
        torch.testing.assert_close(table, ref_sincos_2d(config["hidden_size"], 70, 70), atol=1e-5, rtol=0)

    # The same weights put in by hand into a freshly built model give the same outputs.
    by_hand = build_model(config, device="cpu")
    by_hand.load_state_dict(stored, strict=True)
    batch = make_batch(config, MIXED_SAMPLES)
    del batch["labels"]
    model.eval()
    by_hand.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(logits, by_hand(**batch).logits)

        # save_pretrained (as the Trainer's checkpoints do) then load again: nothing changes.
        model.save_pretrained(tmp_path / "saved")
        again = load_model(tmp_path / "saved")
        assert type(again) is EXPECTED_CLASS[family]
        assert again.state_dict().keys() == state.keys()
        for key, tensor in again.state_dict().items():
            assert torch.equal(tensor, state[key]), key
        assert torch.equal(again.eval()(**batch).logits, logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("change", ["missing", "extra"])
def test_load_rejects_checkpoint_with_wrong_keys(family, change, tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir(family), target)
    tensors = load_file(target / "model.safetensors")
    if change == "missing":
        key = "resampler.proj"
        del tensors[key]
    else:
        key = "resampler.not_a_weight"
        tensors[key] = torch.zeros(3)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_model(target)


# ---------------------------------------------------------------------------------------------------
# 4. Forward and backward


def _assert_every_trainable_parameter_has_a_gradient(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_with_mixed_images(family, load_tiny):
    model, config = load_tiny(family)
    model.train()
    batch = make_batch(config, MIXED_SAMPLES)
    assert batch["pixel_values"].shape == (5, P, 9 * P, 3)

    loss = model(**batch).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    _assert_every_trainable_parameter_has_a_gradient(model)
    # Gradients reach the vision tower through the image features (not just a *0 term).
    patch = model.vpm.patch_embed.proj if family == "2.0" else model.vpm.embeddings.patch_embedding
    assert patch.weight.grad.abs().sum() > 0
    assert model.resampler.query.grad.abs().sum() > 0
    assert model.resampler.proj.grad.abs().sum() > 0
    embed_grad = model.get_input_embeddings().weight.grad
    # Placeholder embeddings are replaced by image features, so no gradient reaches <unk>'s row ...
    assert torch.count_nonzero(embed_grad[UNK]) == 0
    # ... while every other token that is the input of a supervised prediction gets one.
    feeds_loss = batch["input_ids"][:, :-1][batch["labels"][:, 1:] != -100].unique()
    feeds_loss = feeds_loss[feeds_loss != UNK]
    assert (embed_grad[feeds_loss].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_batch_keeps_vision_in_graph(family, load_tiny):
    model, config = load_tiny(family)
    model.train()
    batch = make_batch(config, [(9, []), (5, [])])
    assert batch["pixel_values"].shape == (0, P, 0, 3)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    # A blank image is encoded and added times 0, so every rank runs the vision backward (ZeRO-3).
    _assert_every_trainable_parameter_has_a_gradient(model)


# ---------------------------------------------------------------------------------------------------
# 5. Loss


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_hand_cross_entropy(family, load_tiny):
    model, config = load_tiny(family)
    model.eval()
    batch = make_batch(config, MIXED_SAMPLES)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        batch_size, length = batch["input_ids"].shape
        assert logits.shape == (batch_size, length, config["vocab_size"])

        flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        flat_targets = labels[:, 1:].reshape(-1)
        expected = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
        torch.testing.assert_close(model(**batch, labels=labels).loss, expected, rtol=1e-5, atol=1e-6)

        items = 37  # e.g. supervised tokens over all gradient-accumulation micro-batches
        total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
        loss = model(**batch, labels=labels, num_items_in_batch=items).loss
        torch.testing.assert_close(loss, total / items, rtol=1e-5, atol=1e-6)
        loss = model(**batch, labels=labels, num_items_in_batch=torch.tensor(items)).loss
        torch.testing.assert_close(loss, total / items, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["2.5"])
@pytest.mark.parametrize("supervised", [3, None], ids=["fewer-than-chunks", "all"])
def test_chunked_loss_gradients_equal_full_logits(family, supervised, load_tiny):
    model, config = load_tiny(family)
    model.train()
    batch = make_batch(config, MIXED_SAMPLES)
    labels = batch.pop("labels")
    keep = (labels[:, 1:] != -100).nonzero()[:supervised]  # the first `supervised` targets (None: all)
    supervised = len(keep)
    labels = torch.full_like(labels, -100)
    labels[keep[:, 0], keep[:, 1] + 1] = batch["input_ids"][keep[:, 0], keep[:, 1] + 1]
    params = [p for p in model.parameters() if p.requires_grad]

    calls = []
    handle = model.llm.lm_head.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        loss = model(**batch, labels=labels).loss
        forward_calls = len(calls)
        chunked = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        handle.remove()
    # The same number of lm_head calls on every rank whatever its batch (ZeRO-3 gathers on each), and
    # each chunk recomputed once in the backward.
    assert forward_calls == LOSS_CHUNKS and len(calls) == 2 * LOSS_CHUNKS
    assert sum(calls[:LOSS_CHUNKS]) == supervised and max(calls) == math.ceil(supervised / LOSS_CHUNKS)

    logits = model(**batch).logits[:, :-1].float()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(chunked, torch.autograd.grad(expected, params, allow_unused=True)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_resampler_checkpointing_keeps_gradients_and_saves_less(load_tiny):
    model, config = load_tiny("2.5")
    model.train()
    # Reentrant checkpointing asked for, vision frozen: the resampler's input then needs no grad.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.vpm.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(False)
    assert model.resampler.gradient_checkpointing
    batch = make_batch(config, MIXED_SAMPLES)
    params = list(model.resampler.parameters())

    def run(checkpointed: bool) -> tuple[int, list[torch.Tensor]]:
        model.resampler.gradient_checkpointing = checkpointed
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch).loss
        model.zero_grad(set_to_none=True)
        loss.backward()  # reentrant checkpointing refuses autograd.grad
        return sum(saved), [p.grad for p in params]

    saved_plain, grads_plain = run(False)
    saved_ckpt, grads_ckpt = run(True)
    assert saved_ckpt < saved_plain
    for got, want in zip(grads_ckpt, grads_plain):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# 6. Quirks (spec §1.2, §1.3, §2.3)


def test_quirk_2_5_one_row_position_ids(load_tiny):
    v25, _ = load_tiny("2.5")
    v26, _ = load_tiny("2.6")
    h, w = 3, 5
    # 2.5 sees a 1 x 15 strip: row 0 of the 70 x 70 table, columns bucketed over 15.
    expected_25 = [0 * 70 + spec_bucket(k, h * w) for k in range(h * w)]
    # 2.6 buckets rows over h and columns over w (tgt_sizes), row-major.
    expected_26 = [spec_bucket(i, h) * 70 + spec_bucket(j, w) for i in range(h) for j in range(w)]
    # The literal prefixes the spec's numerical check reported.
    assert expected_25[:3] == [0, 4, 9] and expected_25[-1] == 65
    assert expected_26[:6] == [0, 14, 28, 42, 56, 1610]

    sizes = torch.tensor([[h, w]])
    assert v25.vpm.embeddings.position_ids(sizes, h * w)[0].tolist() == expected_25
    assert v26.vpm.embeddings.position_ids(sizes, h * w)[0].tolist() == expected_26
    # Beside a longer strip, 2.5 buckets every slice's columns over the longest one (nb_w = maxN),
    # whatever its own size; 2.6 keeps each slice's grid and gives padded slots id 0.
    batched = torch.tensor([[1, 4], [h, w]])
    assert v25.vpm.embeddings.position_ids(batched, h * w).tolist() == [expected_25, expected_25]
    ids_26 = v26.vpm.embeddings.position_ids(batched, h * w).tolist()
    assert ids_26[0] == [spec_bucket(j, 4) for j in range(4)] + [0] * (h * w - 4)
    assert ids_26[1] == expected_26

    # The embeddings' forward uses exactly these rows of the position table.
    image = random_image(h, w)
    pixel_values, tgt_sizes = strip_batch([image])
    for model, expected in ((v25, expected_25), (v26, expected_26)):
        embeddings = model.vpm.embeddings
        with torch.no_grad():
            patches = embeddings.patch_embedding(image[None]).flatten(2).transpose(1, 2)  # from the image
            want = patches + embeddings.position_embedding.weight[expected]
            torch.testing.assert_close(embeddings(pixel_values, tgt_sizes), want, atol=1e-5, rtol=1e-5)


def test_quirk_2_5_vision_padding_changes_features(load_tiny):
    short, long = random_image(2, 3), random_image(3, 5)
    n = 6
    for family in ("2.5", "2.6"):
        model, config = load_tiny(family)
        model.eval()
        with torch.no_grad():
            alone = model.vpm(*strip_batch([short]))[0]
            together = model.vpm(*strip_batch([short, long]))[0, :n]
            padded_alone = model.vpm(*strip_batch([short], length=15))[0, :n]
        assert alone.shape == (n, config["vision_config"]["hidden_size"])
        if family == "2.5":
            # Unmasked padding and columns bucketed over the longest strip: the features depend on
            # what else is in the vision batch, and equal those of the slice zero-padded alone.
            assert (together - alone).abs().max() > 1e-3
            torch.testing.assert_close(together, padded_alone, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded_alone, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["2.6", "2.0"])
def test_quirk_2_6_batched_features_equal_one_at_a_time(family, load_tiny):
    # 2.6 masks the padding in both the vision encoder and the resampler. 2.0 encodes each image
    # unpadded (ours groups equal sizes, hence the two 2 x 3 slices: the order must survive).
    model, config = load_tiny(family)
    model.eval()
    images = [random_image(2, 3), random_image(3, 5), random_image(1, 4), random_image(2, 3), random_image(5, 2)]
    with torch.no_grad():
        batched = model.encode_slices(*strip_batch(images))
        assert batched.shape == (len(images), config["query_num"], config["hidden_size"])
        for index, image in enumerate(images):
            alone = model.encode_slices(*strip_batch([image]))[0]
            torch.testing.assert_close(batched[index], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_quirk_2_0_image_features_unscaled(family, load_tiny):
    model, config = load_tiny(family)
    model.eval()
    scale = config.get("scale_emb", 1)  # 12 for 2.0, absent (1) for 2.5 / 2.6
    assert scale == (12 if family == "2.0" else 1)
    batch = make_batch(config, MIXED_SAMPLES)
    with torch.no_grad():
        embeds = model.embed_inputs(
            batch["input_ids"], batch["pixel_values"], batch["tgt_sizes"], batch["image_bound"], batch["slice_counts"]
        )
        pixels = normalize_pixels(batch["pixel_values"], batch["tgt_sizes"], torch.float32)
        features = model.encode_slices(pixels, batch["tgt_sizes"])
        text = model.llm.model.embed_tokens(batch["input_ids"]) * scale
    is_image = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for k, (b, start, end) in enumerate(batch["image_bound"].tolist()):
        assert torch.equal(embeds[b, start:end], features[k]), f"slice {k}"
        is_image[b, start:end] = True
    assert torch.equal(embeds[~is_image], text[~is_image])


def test_quirk_column_first_sincos_halves():
    dim, h, w = 32, 3, 5
    table = torch.from_numpy(sincos_2d(dim, h, w))
    assert table.shape == (h, w, dim)
    half = dim // 2
    # First half: a function of the column j only; second half: of the row i only.
    assert torch.equal(table[:, :, :half], table[:1, :, :half].expand(h, -1, -1))
    assert torch.equal(table[:, :, half:], table[:, :1, half:].expand(-1, w, -1))
    columns = torch.from_numpy(sincos_1d(half, torch.arange(w).numpy()))
    rows = torch.from_numpy(sincos_1d(half, torch.arange(h).numpy()))
    assert torch.equal(table[0, :, :half], columns)
    assert torch.equal(table[:, 0, half:], rows)
    # And the 1-D codes are the spec's formula, in float32.
    positions = torch.arange(70)
    torch.testing.assert_close(
        torch.from_numpy(sincos_1d(half, positions.numpy())), ref_sincos_1d(half, positions).float(), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(table, ref_sincos_2d(dim, h, w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixed_query_pos", [True, False], ids=["2.0", "2.5-2.6"])
def test_quirk_resampler_x_at_proj_and_mha_layout(fixed_query_pos):
    dim, heads, kv_dim, queries = 256, 2, 48, 16  # two 128-wide heads, so the head split matters
    resampler = Resampler(queries, dim, heads, kv_dim, fixed_query_pos=fixed_query_pos)
    with torch.no_grad():
        for name, parameter in resampler.named_parameters():
            if name == "pos_embed":
                continue
            if name.startswith("ln_") and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            elif parameter.dim() == 1:
                parameter.copy_(0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter.shape[-1]))
    proj = resampler.proj.detach()
    assert not torch.allclose(proj, proj.T)

    if fixed_query_pos:  # 2.0: one image size per call, no padding
        tgt_sizes = torch.tensor([[3, 5], [3, 5]])
    else:
        tgt_sizes = torch.tensor([[2, 3], [3, 5], [1, 4]])
    length = int((tgt_sizes[:, 0] * tgt_sizes[:, 1]).max())
    x = torch.randn(len(tgt_sizes), length, kv_dim)  # padding rows are random too: they must be masked

    mha = nn.MultiheadAttention(dim, heads)
    with torch.no_grad():
        mha.in_proj_weight.copy_(resampler.attn.in_proj_weight)
        mha.in_proj_bias.copy_(resampler.attn.in_proj_bias)
        mha.out_proj.weight.copy_(resampler.attn.out_proj.weight)
        mha.out_proj.bias.copy_(resampler.attn.out_proj.bias)

    def layer_norm(t, ln):
        return F.layer_norm(t, (dim,), ln.weight, ln.bias, eps=1e-6)

    with torch.no_grad():
        kv = layer_norm(x @ resampler.kv_proj.weight.T, resampler.ln_kv)
        pos = torch.zeros(len(tgt_sizes), length, dim)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos[i, : h * w] = ref_sincos_2d(dim, h, w).reshape(h * w, dim)
        query = layer_norm(resampler.query, resampler.ln_q)
        if fixed_query_pos:
            side = math.isqrt(queries)
            query_pos = ref_sincos_2d(dim, side, side).reshape(queries, dim)
            torch.testing.assert_close(resampler.pos_embed.detach(), query_pos, atol=1e-5, rtol=0)
            query = query + query_pos
            mask = None
        else:
            mask = torch.arange(length)[None, :] >= (tgt_sizes[:, 0] * tgt_sizes[:, 1])[:, None]
        attended, _ = mha(
            query[:, None].expand(-1, len(tgt_sizes), -1),
            (kv + pos).transpose(0, 1),
            kv.transpose(0, 1),
            key_padding_mask=mask,
            need_weights=False,
        )
        normed = layer_norm(attended.transpose(0, 1), resampler.ln_post)
        expected = normed @ proj

        out = resampler(x, tgt_sizes)
    assert out.shape == (len(tgt_sizes), queries, dim)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, normed @ proj.T, atol=1e-2)


def test_quirk_non_persistent_pos_embed(load_tiny):
    v20, config = load_tiny("2.0")
    assert "resampler.pos_embed" in v20.state_dict()
    assert isinstance(v20.resampler.pos_embed, nn.Parameter) and not v20.resampler.pos_embed.requires_grad
    side = math.isqrt(config["query_num"])
    torch.testing.assert_close(
        v20.resampler.pos_embed.detach(),
        ref_sincos_2d(config["hidden_size"], side, side).reshape(side * side, -1),
        atol=1e-5,
        rtol=0,
    )

    for family in ("2.5", "2.6"):
        model, config = load_tiny(family)
        assert "resampler.pos_embed" not in model.state_dict()
        assert "resampler.pos_embed" in dict(model.named_buffers())
        assert "resampler.pos_embed" not in dict(model.named_parameters())
        assert tuple(model.resampler.pos_embed.shape) == (70, 70, config["hidden_size"])

    # 2.5's cache grows when a slice is wider than 70 patches (here 1 x 75), and still stays out of
    # the state dict.
    v25, config = load_tiny("2.5")
    dim = config["hidden_size"]
    x = torch.randn(1, 75, config["vision_config"]["hidden_size"])
    with torch.no_grad():
        out = v25.resampler(x, torch.tensor([[1, 75]]))
    assert out.shape == (1, config["query_num"], dim) and torch.isfinite(out).all()
    table = v25.resampler.pos_embed
    assert table.shape[0] >= 75 and table.shape[1] >= 75
    torch.testing.assert_close(table[:75, :75], ref_sincos_2d(dim, 75, 75), atol=1e-5, rtol=0)
    assert "resampler.pos_embed" not in v25.state_dict()


def _hook_minicpm_scalings(llama: LlamaForCausalLM, residual_scale: float, logit_divisor: float) -> None:
    """Turns a stock Llama into MiniCPM-2.4B per spec §1.1, with forward hooks."""
    for layer in llama.model.layers:
        layer.self_attn.register_forward_hook(lambda m, i, out: (out[0] * residual_scale, *out[1:]))
        layer.mlp.register_forward_hook(lambda m, i, out: out * residual_scale)
    llama.model.norm.register_forward_hook(lambda m, i, out: out / logit_divisor)


def test_quirk_2_0_minicpm_scalings(load_tiny):
    model, config = load_tiny("2.0")
    minicpm = model.llm.eval()
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    inputs_embeds = torch.randn(2, 9, hidden)

    # A stock Llama with the same weights, plus the spec's scalings as hooks, gives the same logits.
    llama = LlamaForCausalLM(copy.deepcopy(minicpm.config)).eval()
    llama.load_state_dict(minicpm.state_dict(), strict=True)
    plain_llama_logits = llama(inputs_embeds=inputs_embeds).logits
    residual_scale = config["scale_depth"] / math.sqrt(layers)  # 1.4 / sqrt(2)
    logit_divisor = hidden / config["dim_model_base"]  # 128 / 32
    assert residual_scale != 1 and logit_divisor != 1
    _hook_minicpm_scalings(llama, residual_scale, logit_divisor)
    with torch.no_grad():
        expected = llama(inputs_embeds=inputs_embeds).logits
        got = minicpm(inputs_embeds=inputs_embeds).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain_llama_logits, atol=1e-3)

    # With neutral values (scale_depth = sqrt(L), dim_model_base = hidden) MiniCPM is plain Llama.
    neutral_config = copy.deepcopy(minicpm.config)
    neutral_config.scale_depth = math.sqrt(layers)
    neutral_config.dim_model_base = hidden
    neutral = MiniCPMForCausalLM(neutral_config).eval()
    neutral.load_state_dict(minicpm.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            neutral(inputs_embeds=inputs_embeds).logits, plain_llama_logits, atol=1e-6, rtol=1e-6
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_quirk_image_text_mismatch_error(family, load_tiny):
    model, config = load_tiny(family)
    batch = make_batch(config, MIXED_SAMPLES)  # 5 slices, 5 bounds
    query_num = config["query_num"]

    fewer = dict(batch, image_bound=batch["image_bound"][:-1])
    with pytest.raises(ImageTextMismatchError) as error:
        model(**fewer)
    assert re.search(r"\b5\b", str(error.value)) and re.search(r"\b4\b", str(error.value)), str(error.value)

    short_span = batch["image_bound"].clone()
    short_span[2, 2] -= 1
    with pytest.raises(ImageTextMismatchError) as error:
        model(**dict(batch, image_bound=short_span))
    message = str(error.value)
    assert str(query_num) in message and str(query_num - 1) in message, message


# ---------------------------------------------------------------------------------------------------
# 7. ZeRO-3: every weight is read inside the forward of the module that holds it


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_owner_runs_forward(family, load_tiny):
    model, config = load_tiny(family)
    model.train()
    ran: set[int] = set()
    handles = [
        module.register_forward_pre_hook(lambda m, args: ran.add(id(m))) for module in model.modules()
    ]
    try:
        model(**make_batch(config, MIXED_SAMPLES)).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    never_ran = [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
        if id(module) not in ran
    ]
    assert not never_ran, f"parameters read outside their module's forward: {never_ran}"
    if family == "2.0":  # the two tables read directly by their holders
        assert id(model.resampler) in ran and id(model.vpm) in ran
