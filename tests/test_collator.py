"""MiniCPMVCollator on mixed batches (the batch contract of docs/architecture.md) and LengthGroupedSampler.

Samples go through the training path (SampleEncoder on synthetic images) for every family, are
collated, checked key by key, and fed to the tiny model for a forward and backward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from finetune.data.collator import LengthGroupedSampler, MiniCPMVCollator
from finetune.data.dataset import DataSettings, SampleEncoder
from finetune.data.images import to_patch_strips
from finetune.data.templates import IGNORE_INDEX
from finetune.models.loading import load_model, read_config
from finetune.models.tokenizer import load_tokenizer, special_token_ids

P = 14
FAMILIES = ["2.0", "2.5", "2.6"]
CONTRACT_KEYS = {
    "input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "tgt_sizes", "image_bound",
    "slice_counts",
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# (record, images, slices expected): no image; one unsliced; two (unsliced + 2x1 grid); one 3x3 grid.
CASES = [
    (_chat("hello there, how are you today?", "hi"), [], 0),
    (_chat("<image_00>\nWhat is it?", "A thing."), [(300, 200)], 1),
    (_chat("Compare <image_00> with <image_01>.", "The second is wider and has more detail."),
     [(300, 300), (700, 500)], 1 + 3),
    (_chat("<image_00>\nRead the page.", "It is a page of text."), [(1344, 1344)], 1 + 9),
]


class Family:
    def __init__(self, family: str, directory, scale_resolution: int = 448) -> None:
        self.family = family
        self.directory = directory
        self.tokenizer = load_tokenizer(directory)
        self.tokens = special_token_ids(self.tokenizer)
        self.query_num = read_config(directory)["query_num"]
        settings = DataSettings(
            family, self.query_num, max_slice_nums=9, model_max_length=4096, scale_resolution=scale_resolution
        )
        self.encoder = SampleEncoder(settings, self.tokenizer, self.tokens)
        self.collator = MiniCPMVCollator(self.tokens.pad, self.query_num)

    def samples(self, cases=CASES) -> list[dict]:
        return [
            self.encoder.encode(record, [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
            for record, sizes, _ in cases
        ]


@pytest.fixture(params=FAMILIES)
def family(request, tiny_model_dir) -> Family:
    return Family(request.param, tiny_model_dir(request.param))


def test_mixed_batch_follows_the_batch_contract(family):
    samples = family.samples()
    batch = family.collator(samples)
    t, q = family.tokens, family.query_num
    assert set(batch) == CONTRACT_KEYS

    lengths = [len(s["input_ids"]) for s in samples]
    B, T = len(samples), max(lengths)
    counts = [expected for _, _, expected in CASES]
    S = sum(counts)
    slices = [piece for s in samples for piece in s["slices"]]
    assert [len(s["slices"]) for s in samples] == counts
    grids = [(piece.shape[0] // P, piece.shape[1] // P) for piece in slices]
    L = max(h * w for h, w in grids)

    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long, key
    assert batch["pixel_values"].shape == (S, P, L * P, 3) and batch["pixel_values"].dtype == torch.uint8
    assert batch["tgt_sizes"].shape == (S, 2) and batch["tgt_sizes"].dtype == torch.long
    assert batch["image_bound"].shape == (S, 3) and batch["image_bound"].dtype == torch.long
    assert batch["slice_counts"].tolist() == counts and batch["slice_counts"].dtype == torch.long
    assert batch["tgt_sizes"].tolist() == [list(g) for g in grids]

    # Text: right-padded with the pad id, -100, attention 0 and position 0.
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], sample["input_ids"])
        assert torch.equal(batch["labels"][row, :n], sample["labels"])
        assert torch.equal(batch["position_ids"][row, :n], torch.arange(n))
        assert batch["attention_mask"][row, :n].eq(1).all()
        assert batch["input_ids"][row, n:].eq(t.pad).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row, n:].eq(0).all()
        assert batch["position_ids"][row, n:].eq(0).all()
    assert lengths.count(T) >= 1 and min(lengths) < T  # the batch really has padding

    # Bounds: one row per slice, in sample order, each on a run of query_num <unk> right after an
    # image/slice start tag and right before the matching end tag.
    bounds = batch["image_bound"].tolist()
    assert [b[0] for b in bounds] == [row for row, c in enumerate(counts) for _ in range(c)]
    starts = {t.image_start, t.slice_start} if family.family == "2.6" else {t.image_start}
    for row, start, end in bounds:
        assert end - start == q
        assert batch["input_ids"][row, start:end].eq(t.unk).all()
        assert int(batch["input_ids"][row, start - 1]) in starts
        assert int(batch["input_ids"][row, end]) in {t.image_end, t.slice_end}
    # ... and they cover every <unk> of the batch (pad is not <unk> except in 2.0, where it is).
    unk = batch["input_ids"].eq(t.unk) & batch["attention_mask"].bool()
    assert int(unk.sum()) == S * q

    # Pixels: each strip holds its slice, in order sample -> image -> [source, cells], zero-padded.
    for k, (strip, piece, (h, w)) in enumerate(zip(batch["pixel_values"], slices, grids)):
        alone, _ = to_patch_strips([piece])
        assert torch.equal(strip[:, : h * w * P], alone[0]), k
        assert strip[:, h * w * P :].eq(0).all(), k


def test_slices_of_one_sample_are_source_then_grid(family):
    """The 1344x1344 image: source first (downscaled to 448x448), then 9 cells of 448x448."""
    (sample,) = family.samples(CASES[3:])
    assert [tuple(piece.shape) for piece in sample["slices"]] == [(448, 448, 3)] * 10
    assert sample["image_spans"].tolist() == sorted(sample["image_spans"].tolist())


def test_text_only_batch_has_no_slices(family):
    batch = family.collator(family.samples(CASES[:1]) * 2)
    assert batch["pixel_values"].shape == (0, P, 0, 3)
    assert batch["tgt_sizes"].shape == (0, 2) and batch["tgt_sizes"].dtype == torch.long
    assert batch["image_bound"].shape == (0, 3) and batch["image_bound"].dtype == torch.long
    assert batch["slice_counts"].tolist() == [0, 0]
    assert batch["attention_mask"].eq(1).all()  # equal lengths: no padding


@pytest.mark.parametrize("name", FAMILIES)
def test_collated_batch_trains_the_tiny_model(tiny_model_dir, name):
    # Slices of ~224x224 instead of 448x448 (a quarter of the patches, same code path) keep the
    # tiny model's CPU forward cheap; the batch still mixes no image, a sliced one and two, one with 9 cells.
    family = Family(name, tiny_model_dir(name), scale_resolution=224)
    batch = family.collator(family.samples(CASES[:3]))
    assert batch["slice_counts"].tolist() == [0, 3, 10]  # smaller slices: the 700x500 image gets 3x3
    torch.manual_seed(0)
    model = load_model(family.directory).train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for part, module in [("vpm", model.vpm), ("resampler", model.resampler), ("llm", model.llm)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, part


def test_batches_from_dataloader_workers_are_identical(family):
    """In a worker the collator builds pixel_values in shared memory; the batch must not change."""
    samples = family.samples(CASES[:3])
    expected = family.collator(samples)
    loader = DataLoader(samples, batch_size=len(samples), collate_fn=family.collator, num_workers=1)
    (batch,) = list(loader)
    assert batch["pixel_values"].is_shared()
    for key in CONTRACT_KEYS:
        assert torch.equal(batch[key], expected[key]), key


# ------------------------------------------------------------------------------------- sampler


def _skewed_lengths(n: int = 2000, seed: int = 0) -> list[int]:
    """Mostly short samples with a long tail (many text-only answers, a few sliced images)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=n), 8, 4096)]


def _mean_padding(order: list[int], lengths: list[int], batch_size: int) -> float:
    pads = []
    for begin in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[begin : begin + batch_size]]
        pads.append(sum(max(batch) - n for n in batch))
    return float(np.mean(pads))


def test_sampler_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = _skewed_lengths(1000)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths))) and len(sampler) == len(lengths)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(len(lengths))) and second != first
    again = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    again.set_epoch(1)
    assert list(again) == second  # a resumed run replays the same epoch
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4)) != first


def test_sampler_pads_less_than_random_batches():
    lengths, batch_size = _skewed_lengths(), 8
    grouped = _mean_padding(list(LengthGroupedSampler(lengths, batch_size=batch_size, seed=0)), lengths, batch_size)
    generator = torch.Generator().manual_seed(0)
    shuffled = _mean_padding(torch.randperm(len(lengths), generator=generator).tolist(), lengths, batch_size)
    assert grouped < 0.25 * shuffled, (grouped, shuffled)
