"""Data-path throughput on the CPU: ours beside a straightforward reference-recipe-style path.

    .venv/bin/python bench/data_throughput.py                  # ~2 min on 2 CPU cores
    .venv/bin/python bench/data_throughput.py --rounds 15 --sets small --workers 0
    .venv/bin/python bench/data_throughput.py --stages         # + CPU ms per step (decode, slice, ...)
    .venv/bin/python bench/data_throughput.py --profile small  # cProfile of both paths on one set

The whole path from a record to a batch: decode the JPEG, slice, normalise, lay out patch strips,
tokenise, collate. Both paths read the same records (MiniCPM-V format, loaded and validated by
`load_conversations` beforehand, as training does) through a torch DataLoader (batch 4), and must
produce identical batches (checked key by key before timing, ours normalised; the bench exits
non-zero otherwise).

- ours  `ConversationDataset.__getitem__` (open_image, preprocess_image, ChatEncoder) +
        `MiniCPMVCollator` (to_patch_strips): uint8 strips. The x / 255, mean = std = 0.5 step is
        the model's first operation, on the accelerator in training (`normalize_pixels`); the
        identity check applies it, and --stages prints what it would cost on the CPU.
- ref   the reference fine-tune's steps, transcribed here: `Image.open().convert("RGB")`, its
        `slice_image` (PIL resize + one crop per cell), per slice `np.array` -> ToTensor + Normalize
        written without torchvision (the same float32 operations), `reshape_by_patch` per slice with
        `F.unfold`; the placeholder string expanded into the text and the whole conversation
        tokenised as one string through the chat template, labels and image bounds found by
        scanning the ids (the reference's qwen rule); batches padded with Python loops.

Image sets (photos from scikit-image, resized and saved as JPEG q90):
- small  ~300x300 (unsliced: upscaled to ~448x448, 1 slice);
- large  1344x1344 to 2048x1536 (3x3 and 2x4-style grids, 9-10 slices each);
- mixed  text-only, small, large and two-image samples.

Figures, each the median of --rounds passes, ours and ref alternating so that load from other
processes hits both alike, after one warm-up pass (workers are persistent):
- ours/s, ref/s: samples per second of wall time, the DataLoader's output rate;
- cpu ms: CPU time (user + system, main process plus workers, from /proc) per sample. On a shared
  machine this is the steadier figure: it does not count time spent waiting for a core;
- per-core: 1000 / cpu ms, the rate of one worker that has a core to itself. Each worker (and the
  main process with --workers 0) runs torch with 1 thread.
MiniCPM-V 2.6 layout, query_num 64 (the released value), tiny tokenizer (a byte-level BPE with the
real special tokens and chat template).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer is used

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as photos  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data.collator import MiniCPMVCollator  # noqa: E402
from finetune.data.dataset import ConversationDataset, DataSettings, SampleEncoder  # noqa: E402
from finetune.data.formats import load_conversations  # noqa: E402
from finetune.data.images import open_image, slice_image  # noqa: E402
from finetune.data.slicing import plan_slices  # noqa: E402
from finetune.data.templates import ImageLayout  # noqa: E402
from finetune.models.minicpmv import normalize_pixels  # noqa: E402
from finetune.models.tokenizer import load_tokenizer, special_token_ids, write_tiny_tokenizer  # noqa: E402

FAMILY = "2.6"
QUERY_NUM = 64
MAX_SLICE_NUMS = 9
SCALE_RESOLUTION = 448
PATCH = 14
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------- the data


SMALL = [(300, 300), (320, 240), (240, 320), (288, 288), (300, 225), (336, 280)]
LARGE = [(1344, 1344), (1600, 1200), (2048, 1536), (1200, 1600), (1400, 1400), (1792, 1344)]
PHOTOS = [photos.astronaut, photos.coffee, photos.chelsea, photos.rocket, photos.immunohistochemistry]
QUESTIONS = ["What is in the picture?", "Describe this image in detail.", "What colour is it?"]
ANSWERS = [
    "The image shows a small brown dog sitting on a wooden bench in a green park.",
    "There are three cats: one is black, one is white with grey spots, and one is orange.",
    "The chart compares the monthly rainfall of four cities.",
]


def write_images(directory: Path) -> dict[str, list[str]]:
    """JPEGs of each set's sizes, from scikit-image's photos (resized with BICUBIC)."""
    names: dict[str, list[str]] = {"small": [], "large": []}
    for group, sizes in [("small", SMALL), ("large", LARGE)]:
        for k, size in enumerate(sizes):
            photo = Image.fromarray(PHOTOS[k % len(PHOTOS)]()).convert("RGB")
            name = f"{group}_{k}_{size[0]}x{size[1]}.jpg"
            photo.resize(size, Image.Resampling.BICUBIC).save(directory / name, quality=90)
            names[group].append(name)
    return names


def _sample(index: int, images: list[str]) -> dict:
    question, answer = QUESTIONS[index % 3], ANSWERS[index % 3]
    follow_up = [
        {"role": "user", "content": "And what else can you see?"},
        {"role": "assistant", "content": ANSWERS[(index + 1) % 3]},
    ]
    if not images:
        return {"id": f"s{index}", "conversations": [{"role": "user", "content": question},
                                                    {"role": "assistant", "content": answer}] + follow_up}
    if len(images) == 1:
        first = {"role": "user", "content": f"<image>\n{question}"}
        image: str | dict = images[0]
    else:
        image = {f"<image_{k:02d}>": path for k, path in enumerate(images)}
        first = {"role": "user", "content": "Compare " + " and ".join(image) + ". " + question}
    return {"id": f"s{index}", "image": image,
            "conversations": [first, {"role": "assistant", "content": answer}] + follow_up}


def write_sets(directory: Path, scale: int) -> dict[str, Path]:
    names = write_images(directory)
    small, large = names["small"], names["large"]
    sets = {
        "small": [_sample(i, [small[i % len(small)]]) for i in range(48 * scale)],
        "large": [_sample(i, [large[i % len(large)]]) for i in range(12 * scale)],
        "mixed": [
            _sample(i, [[], [small[i % len(small)]], [large[i % len(large)]],
                        [small[i % len(small)], large[(i + 1) % len(large)]]][i % 4])
            for i in range(24 * scale)
        ],
    }
    paths = {}
    for name, samples in sets.items():
        paths[name] = directory / f"{name}.json"
        paths[name].write_text(json.dumps(samples))
    return paths


# ------------------------------------------------------------------ the reference-style path


def ref_ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def ref_find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    if (width * height > scale_resolution * scale_resolution) or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ref_ensure_divide(width, patch_size), ref_ensure_divide(height, patch_size)


def ref_get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = ref_ensure_divide(width, grid_x)
    refine_height = ref_ensure_divide(height, grid_y)
    best_grid_size = ref_find_best_resize(
        (refine_width / grid_x, refine_height / grid_y), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return best_grid_size[0] * grid_x, best_grid_size[1] * grid_y


def ref_split_to_patches(image, grid):
    patches = []
    width, height = image.size
    grid_x, grid_y = int(width / grid[0]), int(height / grid[1])
    for i in range(0, height, grid_y):
        row = []
        for j in range(0, width, grid_x):
            row.append(image.crop((j, i, j + grid_x, i + grid_y)))
        patches.append(row)
    return patches


def ref_slice_image(image, max_slice_nums=MAX_SLICE_NUMS, scale_resolution=SCALE_RESOLUTION, patch_size=PATCH):
    original_size = image.size
    original_width, original_height = original_size
    log_ratio = math.log(original_width / original_height)
    ratio = original_width * original_height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    patches, best_grid = [], None
    if multiple <= 1:
        best_size = ref_find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=True)
        source_image = image.resize(best_size, Image.Resampling.BICUBIC)
    else:
        candidate_split_grids_nums = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= max_slice_nums]
        best_size = ref_find_best_resize(original_size, scale_resolution, patch_size)
        source_image = image.copy().resize(best_size, Image.Resampling.BICUBIC)
        candidate_grids = []
        for split_grids_nums in candidate_split_grids_nums:
            m = 1
            while m <= split_grids_nums:
                if split_grids_nums % m == 0:
                    candidate_grids.append([m, split_grids_nums // m])
                m += 1
        best_grid, min_error = [1, 1], float("inf")
        for grid in candidate_grids:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:
                best_grid, min_error = grid, error
        refine_size = ref_get_refine_size(original_size, best_grid, scale_resolution, patch_size, allow_upscale=True)
        refine_image = image.resize(refine_size, Image.Resampling.BICUBIC)
        patches = ref_split_to_patches(refine_image, best_grid)
    return source_image, patches, best_grid


_MEAN = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
_STD = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)


def ref_transform(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor() + Normalize(0.5, 0.5), the same operations without torchvision."""
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True))
    tensor = tensor.view(image.size[1], image.size[0], 3).permute((2, 0, 1)).contiguous()
    tensor = tensor.to(dtype=torch.float32).div(255)
    return tensor.clone().sub_(_MEAN).div_(_STD)


def ref_reshape_by_patch(image_tensor: torch.Tensor, patch_size: int = PATCH) -> torch.Tensor:
    patches = F.unfold(image_tensor, (patch_size, patch_size), stride=(patch_size, patch_size))
    patches = patches.reshape(image_tensor.size(0), patch_size, patch_size, -1)
    return patches.permute(0, 1, 3, 2).reshape(image_tensor.size(0), patch_size, -1)


def ref_placeholder(grid, index: int) -> str:
    """2.6's `get_slice_image_placeholder` with `use_image_id` (spec §3.3)."""
    unks = "<unk>" * QUERY_NUM
    text = f"<image_id>{index}</image_id><image>{unks}</image>"
    if grid is not None:
        cols, rows = grid
        text += "\n".join(f"<slice>{unks}</slice>" * cols for _ in range(rows))
    return text


class RefDataset(Dataset):
    def __init__(self, records, tokenizer) -> None:
        self.records = records
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.bound_starts = torch.tensor([ids("<image>"), ids("<slice>")])
        self.bound_ends = torch.tensor([ids("</image>"), ids("</slice>")])
        (self.assistant,) = tokenizer.encode("assistant", add_special_tokens=False)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixel_values, tgt_sizes, grids = [], [], []
        for image_info in record["images"]:
            slices, grid = self.slices(self.load(image_info["path"]))
            tensors = [ref_transform(piece) for piece in slices]
            pixel_values.extend(ref_reshape_by_patch(tensor) for tensor in tensors)
            tgt_sizes.extend((piece.size[1] // PATCH, piece.size[0] // PATCH) for piece in slices)
            grids.append(grid)
        return {"pixel_values": pixel_values, "tgt_sizes": tgt_sizes, **self.text(record, grids)}

    @staticmethod
    def load(path: str) -> Image.Image:
        return Image.open(path).convert("RGB")

    @staticmethod
    def slices(image: Image.Image) -> tuple[list[Image.Image], list[int] | None]:
        source, patches, grid = ref_slice_image(image)
        return [source] + [cell for row in patches for cell in row], grid

    def text(self, record: dict, grids: list) -> dict:
        placeholders = {f"<image_{k:02d}>": ref_placeholder(grid, k) for k, grid in enumerate(grids)}
        messages = []
        for message in record["messages"]:
            content = message["content"]
            for marker, text in placeholders.items():
                content = content.replace(marker, text)
            messages.append({"role": message["role"], "content": content})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        input_ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        # Labels, the reference's qwen rule: from 2 past each "assistant" that follows <|im_start|>
        # through the next <|im_end|>, inclusive (unshifted here, as our batch contract has them).
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for position in torch.where(input_ids == self.assistant)[0].tolist():
            if position > 0 and input_ids[position - 1] == self.im_start:
                end = position + 2
                while input_ids[end] != self.im_end:
                    end += 1
                labels[position + 2 : end + 1] = input_ids[position + 2 : end + 1]
        starts = torch.where(torch.isin(input_ids, self.bound_starts))[0] + 1
        ends = torch.where(torch.isin(input_ids, self.bound_ends))[0]
        return {"input_ids": input_ids, "labels": labels, "image_bound": torch.stack([starts, ends], dim=1)}


def ref_collate(examples: list[dict], pad_id: int) -> dict:
    batch, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, longest, dtype=torch.long)
    position_ids = torch.zeros(batch, longest, dtype=torch.long)
    strips, tgt_sizes, bounds, counts = [], [], [], []
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = example["input_ids"]
        labels[row, :n] = example["labels"]
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
        strips.extend(example["pixel_values"])
        tgt_sizes.extend(example["tgt_sizes"])
        for start, end in example["image_bound"].tolist():
            bounds.append((row, start, end))
        counts.append(len(example["pixel_values"]))
    widest = max((strip.shape[-1] for strip in strips), default=0)
    pixel_values = torch.zeros(len(strips), 3, PATCH, widest)
    for slot, strip in enumerate(strips):
        pixel_values[slot, :, :, : strip.shape[-1]] = strip
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels,
        "pixel_values": pixel_values,
        "tgt_sizes": torch.tensor(tgt_sizes, dtype=torch.long).reshape(-1, 2),
        "image_bound": torch.tensor(bounds, dtype=torch.long).reshape(-1, 3),
        "slice_counts": torch.tensor(counts, dtype=torch.long),
    }


class RefCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples):
        return ref_collate(examples, self.pad_id)


# ------------------------------------------------------------------------------------ timing


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def loader(dataset, collate, workers: int, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers,
        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
    )


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of this process and of `pids` (DataLoader workers), from /proc."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


def one_pass(data: DataLoader) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the main process and the workers) of one pass over `data`."""
    iterator = iter(data)  # persistent workers: the same worker processes every pass
    pids = [worker.pid for worker in getattr(iterator, "_workers", [])]
    cpu, start = _cpu_seconds(pids), time.perf_counter()
    for _ in iterator:
        pass
    return time.perf_counter() - start, _cpu_seconds(pids) - cpu


def check_identical(ours: DataLoader, ref: DataLoader, name: str) -> None:
    for k, (a, b) in enumerate(zip(ours, ref)):
        a["pixel_values"] = normalize_pixels(a["pixel_values"], a["tgt_sizes"], torch.float32)
        for key in a:
            if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
                sys.exit(f"{name} batch {k}: ours and ref differ in {key} ({tuple(a[key].shape)} vs {tuple(b[key].shape)})")


def profile(datasets: dict, label: str, top: int) -> None:
    for name, (data, collate) in datasets.items():
        stream = io.StringIO()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in loader(data, collate, 0, 4):
            pass
        profiler.disable()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
        print(f"\n===== cProfile, {name} on the {label} set (num_workers 0), by own time =====")
        print("\n".join(stream.getvalue().splitlines()[:top + 12]))


def stage_times(records: list[dict], ours: ConversationDataset, collate, ref: RefDataset, ref_collate_,
                batch_size: int, rounds: int, label: str) -> None:
    """CPU ms per sample of each step, both paths, in this process (no DataLoader), median of rounds."""
    encoder = ours.encoder
    settings = encoder.settings

    def ours_sample(record, clock):
        images = clock("decode", lambda: [open_image(image["path"]) for image in record["images"]])
        plans = clock("slice", lambda: [plan_slices(*im.size, max_slice_nums=settings.max_slice_nums) for im in images])
        pieces = clock("slice", lambda: [slice_image(im, plan) for im, plan in zip(images, plans)])
        layouts = [ImageLayout(plan.grid) for plan in plans]
        encoded = clock("tokenise", lambda: encoder.encode_text(record, layouts))
        return {"input_ids": torch.tensor(encoded.input_ids), "labels": torch.tensor(encoded.labels),
                "slices": [p for group in pieces for p in group], "image_spans": torch.tensor(encoded.image_spans)}

    def ref_sample(record, clock):
        images = clock("decode", lambda: [ref.load(image["path"]) for image in record["images"]])
        sliced = clock("slice", lambda: [ref.slices(im) for im in images])
        tensors = clock("normalise", lambda: [ref_transform(p) for group, _ in sliced for p in group])
        strips = clock("strip layout", lambda: [ref_reshape_by_patch(t) for t in tensors])
        text = clock("tokenise", lambda: ref.text(record, [grid for _, grid in sliced]))
        sizes = [(p.size[1] // PATCH, p.size[0] // PATCH) for group, _ in sliced for p in group]
        return {"pixel_values": strips, "tgt_sizes": sizes, **text}

    steps = ["decode", "slice", "normalise", "strip layout", "tokenise", "collate"]
    per_round: dict[str, list[dict]] = {"ours": [], "ref": []}
    for _ in range(rounds + 1):  # the first round warms up; ours and ref alternate
        for name, make, collate_fn in (("ours", ours_sample, collate), ("ref", ref_sample, ref_collate_)):
            spent = dict.fromkeys(steps + ["model normalise"], 0.0)

            def clock(step, work):
                start = time.process_time()
                out = work()
                spent[step] += time.process_time() - start
                return out

            for begin in range(0, len(records), batch_size):
                samples = [make(record, clock) for record in records[begin : begin + batch_size]]
                batch = clock("collate", lambda: collate_fn(samples))
                if name == "ours":  # the model's first operation; on the accelerator in training
                    clock("model normalise",
                          lambda: normalize_pixels(batch["pixel_values"], batch["tgt_sizes"], torch.float32))
            per_round[name].append(spent)
    results = {
        name: {step: 1000 * statistics.median(r[step] for r in rounds_[1:]) / len(records) for step in rounds_[0]}
        for name, rounds_ in per_round.items()
    }
    model_normalise = results["ours"].pop("model normalise")
    results["ref"].pop("model normalise")
    print(f"\nCPU ms per sample by step, {label} set, one process (median of {rounds} passes; ours lays out "
          "strips inside collate)")
    print(f"{'step':<13} {'ours':>7} {'ref':>7}")
    for step in steps + ["total"]:
        ours_ms = sum(results["ours"].values()) if step == "total" else results["ours"][step]
        ref_ms = sum(results["ref"].values()) if step == "total" else results["ref"][step]
        print(f"{step:<13} {ours_ms:>7.1f} {ref_ms:>7.1f}")
    print(f"(ours normalises uint8 in the model, on the accelerator; on this CPU that would add "
          f"{model_normalise:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="small,mixed,large", help="comma-separated: small, mixed, large")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader num_workers values")
    parser.add_argument("--rounds", type=int, default=9, help="timed passes per path (median reported)")
    parser.add_argument("--scale", type=int, default=1, help="multiplies the samples per set (48/24/12)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--profile", nargs="?", const="large", default=None, metavar="SET",
                        help="cProfile both paths on SET (default large) instead of timing")
    parser.add_argument("--top", type=int, default=18, help="rows of the profile to print")
    parser.add_argument("--stages", action="store_true",
                        help="also print CPU ms per step for each set (median of max(rounds, 5) passes)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tiny_tokenizer(FAMILY, tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp / "tokenizer")
        tokens = special_token_ids(tokenizer)
        settings = DataSettings(FAMILY, QUERY_NUM, MAX_SLICE_NUMS, model_max_length=8192)
        encoder = SampleEncoder(settings, tokenizer, tokens)
        paths = write_sets(tmp, args.scale)
        built = {}
        for name in args.sets.split(","):
            records, errors = load_conversations(paths[name], cache_dir=tmp / "cache")
            assert not errors, errors
            records = [records[i] for i in range(len(records))]  # plain dicts: no Arrow reads timed
            built[name] = {
                "ours": (ConversationDataset(records, encoder, [0] * len(records)),
                         MiniCPMVCollator(tokens.pad, QUERY_NUM)),
                "ref": (RefDataset(records, tokenizer), RefCollate(tokens.pad)),
            }
        if args.profile:
            profile(built[args.profile], args.profile, args.top)
            return

        print(f"data throughput, CPU, torch {torch.__version__}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}; family {FAMILY}, query_num {QUERY_NUM}, "
              f"batch {args.batch_size}, median of {args.rounds} passes")
        header = (f"{'set':<6} {'samples':>7} {'slices':>6} {'workers':>7} | {'ours/s':>7} {'ref/s':>7} {'ratio':>6} | "
                  f"{'ours cpu ms':>11} {'ref cpu ms':>10} {'ratio':>6} | {'per-core ours/s':>15} {'ref/s':>6}")
        print(header)
        print("-" * len(header))
        for name, paths_ in built.items():
            ours_data, ours_collate = paths_["ours"]
            ref_data, ref_collate_ = paths_["ref"]
            check_identical(loader(ours_data, ours_collate, 0, args.batch_size),
                            loader(ref_data, ref_collate_, 0, args.batch_size), name)
            slices = sum(len(ours_data[i]["slices"]) for i in range(len(ours_data)))
            n = len(ours_data)
            for workers in (int(w) for w in args.workers.split(",")):
                ours = loader(ours_data, ours_collate, workers, args.batch_size)
                ref = loader(ref_data, ref_collate_, workers, args.batch_size)
                one_pass(ours), one_pass(ref)  # warm-up: worker start, first-touch allocations
                wall, cpu = {"ours": [], "ref": []}, {"ours": [], "ref": []}
                for _ in range(args.rounds):
                    for key, data in (("ours", ours), ("ref", ref)):
                        seconds, cpu_seconds = one_pass(data)
                        wall[key].append(seconds)
                        cpu[key].append(cpu_seconds)
                rate = {key: n / statistics.median(values) for key, values in wall.items()}
                ms = {key: 1000 * statistics.median(values) / n for key, values in cpu.items()}
                print(f"{name:<6} {n:>7} {slices:>6} {workers:>7} | {rate['ours']:>7.1f} {rate['ref']:>7.1f} "
                      f"{rate['ours'] / rate['ref']:>5.2f}x | {ms['ours']:>11.1f} {ms['ref']:>10.1f} "
                      f"{ms['ref'] / ms['ours']:>5.2f}x | {1000 / ms['ours']:>15.1f} {1000 / ms['ref']:>6.1f}",
                      flush=True)
                del ours, ref
        if args.stages:
            for name, paths_ in built.items():
                stage_times(paths_["ours"][0].records, *paths_["ours"], *paths_["ref"], args.batch_size,
                            max(args.rounds, 5), name)


if __name__ == "__main__":
    main()
