"""LLaVA-UHD image slicing as MiniCPM-V does it: pure size arithmetic, no pixels.

`plan_slices` decides, from an image's size alone, how the image becomes a downscaled
"source" slice plus an optional grid of higher-resolution cells. It reproduces the
reference (`slice_image`, `find_best_resize`, `get_refine_size`, `ensure_divide` in the
official image processor and finetune dataset; spec section 3.2) bit for bit, quirks
included, because the placeholder-token count and the pixels the model saw in
pre-training both depend on these exact sizes. `finetune.data.images` does the pixels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height) in pixels, PIL order


@dataclass(frozen=True)
class SlicePlan:
    """How one image is resized and cut.

    Attributes:
        original_size: (w, h) of the image the plan was made for.
        source_size: (w, h) the whole image is resized to for the source slice.
        grid: (cols, rows) of the slice grid, or None when the image is not sliced.
        refine_size: (w, h) the whole image is resized to before the grid cells are
            cropped from it, i.e. (cell_w * cols, cell_h * rows); None when not sliced.
        slice_sizes: (w, h) of each grid cell, row by row (all equal); empty when not
            sliced.
        patch_size: side of a square vision patch; every size above is a multiple of it.
    """

    original_size: Size
    source_size: Size
    grid: Size | None
    refine_size: Size | None
    slice_sizes: tuple[Size, ...]
    patch_size: int

    @property
    def num_slices(self) -> int:
        """Slices the image contributes: the source plus every grid cell."""
        return 1 + len(self.slice_sizes)

    @property
    def tgt_sizes(self) -> list[Size]:
        """(h, w) in patches of each slice, source first then cells row by row.

        Note the order flips to (rows, cols) here, as the model's `tgt_sizes` expect.
        """
        p = self.patch_size
        return [(h // p, w // p) for w, h in (self.source_size, *self.slice_sizes)]


def plan_slices(
    width: int,
    height: int,
    *,
    max_slice_nums: int,
    scale_resolution: int = 448,
    patch_size: int = 14,
) -> SlicePlan:
    """Plan the source resize and the slice grid for an image of `width` x `height`.

    An image whose area is at most `scale_resolution`**2 (or any image when
    `max_slice_nums` is 1) is not sliced: it is resized, up or down, to an area of about
    `scale_resolution`**2 keeping its aspect ratio. A larger image becomes a downscaled
    source of that area plus a grid of up to `max_slice_nums` cells whose shape best
    matches the image's aspect ratio, each cell again of about that area.

    Args:
        width: image width in pixels (> 0).
        height: image height in pixels (> 0).
        max_slice_nums: most grid cells allowed (>= 1); 9 for MiniCPM-V 2.x.
        scale_resolution: side of the square whose area each slice targets.
        patch_size: vision patch side; every output size is a multiple of it.

    Returns:
        The `SlicePlan`.

    Raises:
        ValueError: if any argument is not a positive integer.
    """
    _check_positive_int(
        width=width,
        height=height,
        max_slice_nums=max_slice_nums,
        scale_resolution=scale_resolution,
        patch_size=patch_size,
    )
    # Plain ints, so numpy integers give the same float arithmetic and a clean repr.
    width, height, max_slice_nums, scale_resolution, patch_size = (
        int(v) for v in (width, height, max_slice_nums, scale_resolution, patch_size)
    )
    original = (width, height)
    grid = _best_grid(width, height, max_slice_nums, scale_resolution)
    if grid is None:
        # Small image: scale it (usually up) to the target area, no grid.
        source = _find_best_resize(original, scale_resolution, patch_size, allow_upscale=True)
        return SlicePlan(original, source, None, None, (), patch_size)

    # Sliced images always have area > scale_resolution**2, so this is a downscale.
    source = _find_best_resize(original, scale_resolution, patch_size, allow_upscale=False)
    cell = _cell_size(original, grid, scale_resolution, patch_size)
    cols, rows = grid
    refine = (cell[0] * cols, cell[1] * rows)
    return SlicePlan(original, source, grid, refine, (cell,) * (cols * rows), patch_size)


def _best_grid(width: int, height: int, max_slice_nums: int, scale_resolution: int) -> Size | None:
    """(cols, rows) of the reference grid choice, or None when the image is not sliced."""
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None

    # Reference quirk: only totals next to `multiple` are tried, in the order
    # [multiple - 1, multiple, multiple + 1]; a 1-cell "grid" and totals above the
    # cap are dropped. `multiple` itself always survives, so there is a candidate.
    totals = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(m, n // m) for n in totals for m in range(1, n + 1) if n % m == 0]

    # Closest aspect ratio in log space. Reference quirk: strict `<` keeps the FIRST
    # minimum, so equal errors (e.g. [1, 3] and [3, 1] for a square image) resolve to
    # the candidate listed earlier.
    log_ratio = math.log(width / height)
    best, best_error = None, math.inf
    for cols, rows in candidates:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:
            best, best_error = (cols, rows), error
    return best


def _cell_size(original: Size, grid: Size, scale_resolution: int, patch_size: int) -> Size:
    """(w, h) of one grid cell: reference `get_refine_size` divided by the grid."""
    cols, rows = grid
    # Reference quirk: the original is first rounded to a multiple of the grid with
    # the same `ensure_divide` used for patches (banker's rounding included), and the
    # cell's aspect ratio comes from that rounded size, as floats.
    cell_w = _ensure_divide(original[0], cols) / cols
    cell_h = _ensure_divide(original[1], rows) / rows
    return _find_best_resize((cell_w, cell_h), scale_resolution, patch_size, allow_upscale=True)


def _find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, *, allow_upscale: bool
) -> Size:
    """Reference `find_best_resize`: keep the aspect ratio, target area scale_resolution**2."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        # Reference quirk: `int()` truncates (not rounds), height first, then width is
        # derived from the truncated height. For aspect ratios beyond
        # scale_resolution**2 this reaches 0, which `ensure_divide` lifts to one patch.
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return (_ensure_divide(width, patch_size), _ensure_divide(height, patch_size))


def _ensure_divide(length: float, divisor: int) -> int:
    """Nearest multiple of `divisor`, at least `divisor` (reference `ensure_divide`).

    Python's `round` is banker's rounding (half to even): 35 / 14 = 2.5 rounds to 2, so
    35 -> 28, not 42. Matching the reference needs exactly this, not round-half-up.
    """
    return max(round(length / divisor) * divisor, divisor)


def _check_positive_int(**values: object) -> None:
    for name, value in values.items():
        # bool is an Integral too; True as a width is a caller bug, not a size of 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["SlicePlan", "Size", "plan_slices"]
