"""The pixel path: open an image, cut it as a `SlicePlan` says, lay out uint8 patch strips.

One call per image for the data pipeline::

    plan, slices = preprocess_image(open_image(path), max_slice_nums=9)
    # ... later, in the collator, across every image of the batch:
    pixel_values, tgt_sizes = to_patch_strips(all_slices)

Everything follows the reference preprocessing (spec sections 2.2, 3.1 and 3.2): RGB,
PIL BICUBIC resizing and the `reshape_by_patch` strip layout of MiniCPM-V 2.5/2.6, in
uint8. The last step, x / 255 then mean = std = 0.5, is the model's first operation
(`finetune.models.minicpmv.normalize_pixels`), on the accelerator. Shapes use P for the
patch size (14), h and w for a slice's height and width in patches.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from finetune.data.slicing import SlicePlan, plan_slices

# Images above this many pixels are refused before decoding. 64 MP is far beyond
# anything slicing can use (at most 10 slices of ~448x448 = 2 MP), and a decoded RGB
# image of that size already takes ~190 MB per data-loader worker. Raise it for
# genuinely huge scans.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(Exception):
    """An image that cannot be used, with what went wrong and how to fix it.

    `str(error)` is a complete one-line message meant for the user; callers show it
    without a traceback.

    Attributes:
        reason: what is wrong, naming the file.
        fix: what the user can do about it.
    """

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason} ({fix})")
        self.reason = reason
        self.fix = fix

    def __reduce__(self):
        # Data-loader workers pickle exceptions; the default would call ImageError(message).
        return type(self), (self.reason, self.fix)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB.

    EXIF orientation is deliberately not applied: the reference does
    `Image.open(path).convert("RGB")`, and so does this. Alpha is dropped, not composited.

    Args:
        path: the image file.

    Returns:
        A decoded PIL image in mode "RGB", detached from the file.

    Raises:
        ImageError: the file is missing, is a directory, is empty, cannot be read, is
            not an image PIL can decode (corrupt or truncated), or has more than
            `MAX_IMAGE_PIXELS` pixels.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}", "check the path in the data file")
    if os.path.isdir(path):
        raise ImageError(f"image path is a directory: {path}", "point to an image file inside it")
    if os.path.getsize(path) == 0:
        raise ImageError(f"image file is empty: {path}", "re-export or re-download the image")
    try:
        # Image.open reads only the header, so the size check below runs before any
        # pixel is decoded. PIL's own bomb check (Image.MAX_IMAGE_PIXELS, a global we
        # leave alone) may fire first for headers above twice its limit.
        with warnings.catch_warnings():
            # Our own, stricter limit below replaces PIL's warning with one clear error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _too_large(path, image.width, image.height)
            image.load()
            # convert() copies even when the mode is already RGB; the loaded pixels stay
            # valid after the file is closed, so an RGB image is returned as it is.
            return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"image is too large to decode safely: {path} ({error})",
            f"images are limited to {MAX_IMAGE_PIXELS:,} pixels; downscale it",
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image PIL can read: {path}", "check the file is a valid image (JPEG, PNG, ...)"
        ) from None
    except PermissionError:
        raise ImageError(f"no permission to read image: {path}", "fix the file permissions") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Header fine, data not: truncated downloads, broken chunks, bad codec data.
        raise ImageError(
            f"image file is corrupt or truncated: {path} ({error})",
            "re-export or re-download the image",
        ) from None


def _too_large(path: str, width: int, height: int) -> ImageError:
    return ImageError(
        f"image is too large: {path} is {width}x{height} = {width * height:,} pixels",
        f"the limit is MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,} pixels; downscale the image",
    )


def slice_image(image: Image.Image, plan: SlicePlan) -> list[torch.Tensor]:
    """Cut an image into the slices `plan` describes, as the reference does, as uint8 pixels.

    The source slice is the whole image resized (BICUBIC) to `plan.source_size`. The
    grid cells come from one BICUBIC resize of the whole image to `plan.refine_size`,
    cut top to bottom, left to right; resizing once and cutting (rather than resizing
    each crop) matters, since bicubic weights look across cell borders. The cells are
    views of that one refined array: no copy per cell (so pickling or saving one cell
    carries the whole array; `.contiguous()` first where that matters).

    Args:
        image: the original image, of size `plan.original_size`.
        plan: from `plan_slices(*image.size, ...)`.

    Returns:
        `plan.num_slices` uint8 tensors [H, W, 3]: [source, cell(0,0), cell(0,1), ...],
        their (W, H) sizes `plan.source_size` then `plan.slice_sizes`.

    Raises:
        ValueError: if the image size is not the one the plan was made for.
    """
    if image.size != plan.original_size:
        raise ValueError(f"image size {image.size} does not match the plan's {plan.original_size}")
    image = _as_rgb(image)
    slices = [_pixels(image.resize(plan.source_size, resample=Image.Resampling.BICUBIC))]
    if plan.grid is None:
        return slices
    # PIL's resize to the image's own size only copies; _pixels copies anyway, so skip it.
    refined = image
    if plan.refine_size != image.size:
        refined = image.resize(plan.refine_size, resample=Image.Resampling.BICUBIC)
    pixels = _pixels(refined)
    (cols, rows), (cell_w, cell_h) = plan.grid, plan.slice_sizes[0]
    for row in range(rows):
        for col in range(cols):
            slices.append(pixels[row * cell_h : (row + 1) * cell_h, col * cell_w : (col + 1) * cell_w])
    return slices


def _pixels(image: Image.Image) -> torch.Tensor:
    """uint8 [H, W, 3] of an RGB image (one copy out of PIL, writable so torch does not warn)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def preprocess_image(
    image: Image.Image,
    *,
    max_slice_nums: int,
    scale_resolution: int = 448,
    patch_size: int = 14,
) -> tuple[SlicePlan, list[torch.Tensor]]:
    """Plan and slice one image: the data pipeline's single call per image.

    Args:
        image: the original image (e.g. from `open_image`).
        max_slice_nums: most grid cells (1 disables slicing).
        scale_resolution: side of the square whose area each slice targets.
        patch_size: vision patch side.

    Returns:
        (plan, slices): the `SlicePlan` (its `tgt_sizes` and `grid` drive the
        placeholder text) and `plan.num_slices` uint8 tensors [H_k, W_k, 3], source
        first, with (H_k // patch_size, W_k // patch_size) == plan.tgt_sizes[k].

    Raises:
        ValueError: from `plan_slices`, for invalid settings.
    """
    plan = plan_slices(
        *image.size,
        max_slice_nums=max_slice_nums,
        scale_resolution=scale_resolution,
        patch_size=patch_size,
    )
    return plan, slice_image(image, plan)


def to_patch_strips(slices: Sequence[torch.Tensor], patch_size: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch uint8 slices in the `reshape_by_patch` strip layout of the batch contract.

    Each slice is cut into P x P patches in row-major order and the patches are laid
    side by side, giving a one-patch-tall strip [P, h*w*P, 3]; strips are zero-padded on
    the right to the longest one. A conv with kernel = stride = P over a strip yields the
    same patch sequence as over the image. The pixels stay uint8 and channels-last, as
    decoded: the model normalises them and moves channels first on its own device
    (`finetune.models.minicpmv.normalize_pixels`), so workers, shared memory and the
    host-to-device copy move a quarter of float32's bytes, and the layout copy moves
    whole patch rows (P * 3 bytes) instead of single bytes.

    Args:
        slices: S uint8 tensors [H, W, 3] (as `preprocess_image` returns); H and W must
            be multiples of `patch_size`.
        patch_size: P.

    Returns:
        (pixel_values, tgt_sizes): uint8 [S, P, L*P, 3] with L the largest h*w, and
        long [S, 2] of (h, w) per slice. S = 0 gives [0, P, 0, 3] and [0, 2].

    Raises:
        ValueError: if a slice is not uint8 [H, W, 3] with H and W multiples of `patch_size`.
    """
    grids = [_patch_grid(piece, patch_size, index) for index, piece in enumerate(slices)]
    longest = max((h * w for h, w in grids), default=0)
    # Uninitialised (in shared memory inside a DataLoader worker): every element is written
    # below, the strips by the copy and the padding by fill_.
    pixel_values = _empty_batch((len(slices), patch_size, longest * patch_size, 3))
    for slot, piece, (h, w) in zip(pixel_values, slices, grids):
        # Write straight into the padded batch: view the slot's strip as
        # [P(row in patch), h, w, P(col in patch), 3] and copy the slice's [h, P, w, P, 3]
        # into it with the first two axes swapped. No per-patch loop.
        strip = slot[:, : h * w * patch_size].view(patch_size, h, w, patch_size, 3)
        strip.copy_(piece.view(h, patch_size, w, patch_size, 3).permute(1, 0, 2, 3, 4))
        slot[:, h * w * patch_size :].fill_(0)
    return pixel_values, torch.tensor(grids, dtype=torch.long).reshape(len(grids), 2)


def _empty_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in shared memory when built in a DataLoader worker.

    A worker sends its batch to the main process through shared memory, copying every tensor
    that is not there yet; allocating the pixels there (as torch's default_collate does) skips
    that copy, the largest of the batch.
    """
    numel = math.prod(shape)
    if numel and torch.utils.data.get_worker_info() is not None:
        prototype = torch.empty(0, dtype=torch.uint8)
        return prototype.new(prototype._typed_storage()._new_shared(numel)).view(shape)
    return torch.empty(shape, dtype=torch.uint8)


def _patch_grid(piece: torch.Tensor, patch_size: int, index: int) -> tuple[int, int]:
    """(h, w) in patches of a uint8 [H, W, 3] slice, checking it tiles exactly."""
    shape = tuple(piece.shape)
    if (piece.dtype != torch.uint8 or len(shape) != 3 or shape[2] != 3 or shape[0] % patch_size
            or shape[1] % patch_size or 0 in shape):
        raise ValueError(
            f"slice {index} is {piece.dtype} {shape}; expected uint8 [H, W, 3] with H and W "
            f"positive multiples of the patch size {patch_size}"
        )
    return shape[0] // patch_size, shape[1] // patch_size


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageError",
    "open_image",
    "preprocess_image",
    "slice_image",
    "to_patch_strips",
]
