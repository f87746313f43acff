"""Validation of a whole dataset before training: `finetune check-data` and the trainer's first step.

Structure and image files are checked by `formats.load_conversations` (with every image decoded);
then each good record is encoded exactly as training will encode it, which catches over-long
samples and samples with nothing to train on, and measures token lengths with image tokens counted.

Under torch.distributed every rank validates (each needs the report), but the decoding, by far the
slowest part, is shared: each rank decodes its share of the distinct images and the ranks exchange
what failed, so 8 ranks of a node do not each decode every image.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch.distributed as dist
from PIL import Image

from .dataset import SampleEncoder
from .errors import DataError, DataErrors
from .formats import image_file_exists, load_conversations
from .images import ImageError, open_image
from .templates import ConversationTooLongError, NothingToTrainError


def decodes(path: str) -> str | None:
    """`check_image` hook for the loader: None if the image decodes, else why not (and the fix)."""
    try:
        open_image(path).close()
    except ImageError as error:
        return str(error)
    return None


@dataclass
class DataReport:
    """What validation found: the usable records, their lengths, and every problem."""

    records: object  # datasets.Dataset of canonical records that passed
    lengths: list[int]  # tokens per record, images included (after truncation)
    errors: list[DataError]
    images: int = 0
    slices_per_image: Counter = field(default_factory=Counter)
    truncated: int = 0  # records shortened by whole exchanges to fit model_max_length
    rejected: int = 0  # records over model_max_length refused (--truncation reject)
    bad_indices: set[int] = field(default_factory=set)  # positions in `records` that failed encoding

    def summary(self, model_max_length: int, truncate: bool) -> str:
        lines = [f"samples: {len(self.lengths)} valid, {len(self.errors)} problems"]
        lines.append(f"images: {self.images}")
        if self.slices_per_image:
            histogram = ", ".join(f"{n}: {c}" for n, c in sorted(self.slices_per_image.items()))
            lines.append(f"slices per image (slices: images): {histogram}")
        if self.lengths:
            p = np.percentile(self.lengths, [50, 90, 99, 100]).round().astype(int)
            lines.append(f"tokens per sample, images included: p50 {p[0]}, p90 {p[1]}, p99 {p[2]}, max {p[3]}")
        if truncate:
            lines.append(f"truncated to {model_max_length} tokens by dropping whole exchanges: {self.truncated}")
        else:
            lines.append(f"over {model_max_length} tokens (refused, --truncation reject): {self.rejected}")
        return "\n".join(lines)


def _undecodable_images(data_path: str, image_root: str | None) -> tuple[set[str], dict[str, str]]:
    """(every existing image file validation asks about, why each of them that does not decode fails).

    Each rank of a torch.distributed job decodes every world_size-th of the files; the ranks then
    exchange their failures, so all of them return the same answer.

    Raises:
        DataErrors: the ranks see different image files (node-local copies that differ).
    """
    named: dict[str, str | None] = {}  # path -> why it is not a file

    def remember(path: str) -> str | None:
        named[path] = image_file_exists(path)
        return named[path]

    # Streaming: every sample is validated (each image path asked about once) but no table is written.
    load_conversations(data_path, image_root=image_root, streaming=True, check_image=remember)
    paths = sorted(path for path, problem in named.items() if problem is None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    failures = {path: reason for path in paths[rank::world] if (reason := decodes(path)) is not None}
    if world > 1:
        digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
        everyone: list[tuple[str, dict[str, str]]] = [("", {})] * world
        dist.all_gather_object(everyone, (digest, failures))
        if len({digest for digest, _ in everyone}) > 1:
            raise DataErrors([DataError(
                data_path, None, None, None, "the ranks of this job see different image files",
                "give every node the same data and images (a shared file system or identical copies)",
            )])
        failures = {path: reason for _, part in everyone for path, reason in part.items()}
    return set(paths), failures


def check_data(data_path: str, encoder: SampleEncoder, *, image_root: str | None = None) -> DataReport:
    """Validates every sample of `data_path` as training would read it (collective under torch.distributed)."""
    decoded, failures = _undecodable_images(data_path, image_root)

    def check_image(path: str) -> str | None:
        # Paths that are not files were never decoded: `decodes` says why, at once.
        return failures.get(path) if path in decoded else decodes(path)

    records, errors = load_conversations(data_path, image_root=image_root, check_image=check_image)
    report = DataReport(records=records, lengths=[], errors=list(errors))
    for position, record in enumerate(records):
        try:
            layouts = []
            for image in record["images"]:
                # The loader has decoded every image already; the size needs only the header.
                with Image.open(image["path"]) as opened:
                    layouts.append(encoder.layout(*opened.size))
            encoded = encoder.encode_text(record, layouts)
        except (ConversationTooLongError, NothingToTrainError) as problem:
            if isinstance(problem, NothingToTrainError):
                fix = "give the sample an answer"
            elif not encoder.settings.truncate:
                report.rejected += 1
                # The first-exchange message carries its own fix; a refused truncation needs one.
                fix = (
                    "raise --model_max_length or lower --max_slice_nums, or use --truncation turns to drop "
                    "whole exchanges from the end"
                )
            else:
                fix = ""
            report.errors.append(
                DataError(record["source"]["file"], record["source"]["index"], record["id"], "conversations",
                          str(problem), fix)
            )
            report.bad_indices.add(position)
            continue
        report.lengths.append(len(encoded.input_ids))
        report.images += encoded.num_images
        report.slices_per_image.update(layout.num_slices for layout in layouts[: encoded.num_images])
        report.truncated += encoded.dropped_turns > 0
    if report.bad_indices:
        keep = [i for i in range(len(records)) if i not in report.bad_indices]
        report.records = records.select(keep)
    return report


__all__ = ["DataReport", "check_data", "decodes"]
