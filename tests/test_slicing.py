"""`plan_slices` against an independent transcription of the reference LLaVA-UHD code."""

from __future__ import annotations

import math
import random

import pytest

from finetune.data.slicing import SlicePlan, plan_slices

S = 448  # scale_resolution
P = 14  # patch_size
MAX_SLICE_NUMS = (1, 2, 4, 9)


# --- Reference transcription ----------------------------------------------------------
# A line-by-line transcription of the reference (spec section 3.2: `ensure_divide`,
# `find_best_resize`, `get_refine_size`, the grid search of `slice_image`), kept
# deliberately naive and separate from the implementation. `rounding` is pluggable so
# the tests can show that banker's rounding changes results.


class Reference:
    def __init__(self, rounding=round):
        self.rounding = rounding
        self.ties = 0  # ensure_divide calls that hit x.5 with an even floor

    def ensure_divide(self, length, patch_size):
        quotient = length / patch_size
        if quotient % 1 == 0.5 and math.floor(quotient) % 2 == 0:
            self.ties += 1  # here round-half-to-even and round-half-up disagree
        return max(self.rounding(quotient) * patch_size, patch_size)

    def find_best_resize(self, original_size, scale_resolution, patch_size, allow_upscale=False):
        width, height = original_size
        if (width * height > scale_resolution * scale_resolution) or allow_upscale:
            r = width / height
            height = int(scale_resolution / math.sqrt(r))
            width = int(height * r)
        best_width = self.ensure_divide(width, patch_size)
        best_height = self.ensure_divide(height, patch_size)
        return (best_width, best_height)

    def get_refine_size(self, original_size, grid, scale_resolution, patch_size, allow_upscale=False):
        width, height = original_size
        grid_x, grid_y = grid
        refine_width = self.ensure_divide(width, grid_x)
        refine_height = self.ensure_divide(height, grid_y)
        grid_width = refine_width / grid_x
        grid_height = refine_height / grid_y
        best_grid_size = self.find_best_resize(
            (grid_width, grid_height), scale_resolution, patch_size, allow_upscale=allow_upscale
        )
        return (best_grid_size[0] * grid_x, best_grid_size[1] * grid_y)

    def slice_sizes(self, original_size, max_slice_nums, scale_resolution=S, patch_size=P):
        """(source_size, best_grid or None, refine_size or None) as the reference computes."""
        original_width, original_height = original_size
        log_ratio = math.log(original_width / original_height)
        ratio = original_width * original_height / (scale_resolution * scale_resolution)
        multiple = min(math.ceil(ratio), max_slice_nums)

        if multiple <= 1:
            best_size = self.find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=True)
            return best_size, None, None

        candidate_split_grids_nums = []
        for i in [multiple - 1, multiple, multiple + 1]:
            if i == 1 or i > max_slice_nums:
                continue
            candidate_split_grids_nums.append(i)

        best_resize = self.find_best_resize(original_size, scale_resolution, patch_size)
        candidate_grids = []
        for split_grids_nums in candidate_split_grids_nums:
            m = 1
            while m <= split_grids_nums:
                if split_grids_nums % m == 0:
                    candidate_grids.append([m, split_grids_nums // m])
                m += 1

        best_grid = [1, 1]
        min_error = float("inf")
        for grid in candidate_grids:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:
                best_grid = grid
                min_error = error

        refine_size = self.get_refine_size(
            original_size, best_grid, scale_resolution, patch_size, allow_upscale=True
        )
        return best_resize, tuple(best_grid), refine_size


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


# --- Sizes under test -----------------------------------------------------------------


def _area_boundary_sizes() -> list[tuple[int, int]]:
    """Sizes whose area is exactly k * 448**2 (k = 1, 2, 4, 9, 10) and one pixel either side.

    At exactly k * S**2 `ceil(ratio)` is k; one more row or column pushes it to k + 1.
    """
    sizes = []
    for k in (1, 2, 4, 9, 10):
        area = k * S * S
        for width in (112, 224, 392, 448, 512, 896, 1792, 3584):
            if area % width == 0:
                height = area // width
                sizes += [(width, height), (width, height + 1), (width + 1, height), (width - 1, height)]
    return sizes


def _sizes() -> list[tuple[int, int]]:
    tiny = [(1, 1), (1, 2), (2, 1), (3, 5), (7, 7), (13, 14), (14, 14), (15, 15), (6, 7), (27, 41)]
    huge = [(10_000, 10_000), (20_000, 15_000), (65_535, 65_535), (8_000, 6_000), (4_032, 3_024)]
    extreme = [
        (10_000, 20), (20, 10_000), (1_000_000, 1), (1, 1_000_000), (4_000, 50), (50, 4_000),
        (300_000, 2), (2, 300_000), (5_000, 449), (449, 5_000), (201_000, 1), (1, 201_000),
    ]
    common = [(640, 480), (1920, 1080), (1080, 1920), (1280, 720), (224, 224), (336, 336), (800, 600)]
    odd = [(w, h) for w, h in zip(range(449, 2500, 97), range(2999, 449, -103))]
    rng = random.Random(1234)
    # Log-uniform sides from 1 px to 20k px cover every branch, including ~.5 rounding.
    sampled = [
        (round(math.exp(rng.uniform(0, math.log(20_000)))), round(math.exp(rng.uniform(0, math.log(20_000)))))
        for _ in range(250)
    ]
    return tiny + huge + extreme + common + odd + _area_boundary_sizes() + sampled


SIZES = _sizes()


def _as_reference_tuple(plan: SlicePlan):
    return plan.source_size, plan.grid, plan.refine_size


# --- Tests ----------------------------------------------------------------------------


def test_size_list_is_broad():
    assert len(SIZES) >= 300
    reference = Reference()
    for width, height in SIZES:
        for max_slice_nums in MAX_SLICE_NUMS:
            reference.slice_sizes((width, height), max_slice_nums)
    assert reference.ties > 0, "no size exercises a .5 tie where banker's rounding matters"
    assert any(w * h == S * S for w, h in SIZES)
    assert any(max(w, h) / min(w, h) >= 500 for w, h in SIZES)


@pytest.mark.parametrize("max_slice_nums", MAX_SLICE_NUMS)
def test_plan_matches_reference(max_slice_nums):
    reference = Reference()
    mismatches = []
    for width, height in SIZES:
        expected = reference.slice_sizes((width, height), max_slice_nums)
        actual = _as_reference_tuple(plan_slices(width, height, max_slice_nums=max_slice_nums))
        if actual != expected:
            mismatches.append(((width, height), actual, expected))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_plan_matches_reference_for_other_resolutions():
    reference = Reference()
    for width, height in SIZES[::5]:
        expected = reference.slice_sizes((width, height), 9, scale_resolution=336, patch_size=16)
        plan = plan_slices(width, height, max_slice_nums=9, scale_resolution=336, patch_size=16)
        assert _as_reference_tuple(plan) == expected, (width, height)


def test_bankers_rounding_changes_some_plans():
    """Round-half-up would give different plans for some sizes of the list."""
    half_up = Reference(rounding=_round_half_up)
    differing = [
        (w, h, m)
        for w, h in SIZES
        for m in MAX_SLICE_NUMS
        if _as_reference_tuple(plan_slices(w, h, max_slice_nums=m)) != half_up.slice_sizes((w, h), m)
    ]
    assert differing


def test_bankers_rounding_worked_example():
    # 6x7 is not sliced, so it is upscaled: r = 6/7, height = int(448 / sqrt(6/7))
    # = int(483.89...) = 483 = 14 * 34.5. Half to even gives 34 patches -> 476 px;
    # round-half-up would give 35 -> 490. Width = int(483 * 6/7) ~ 414 -> 30 patches.
    assert 448 / math.sqrt(6 / 7) == pytest.approx(483.89, abs=0.01)
    plan = plan_slices(6, 7, max_slice_nums=9)
    assert plan.source_size == (420, 476)
    assert plan.grid is None


def test_first_strict_minimum_wins_grid_ties():
    # 600x600: ratio = 360000 / 448**2 = 1.79 -> multiple 2 -> totals [2, 3] -> candidates
    # [1,2], [2,1], [1,3], [3,1]. For a square, |0 - log(1/2)| == |0 - log(2)|: a tie
    # that the strict `<` resolves to the first candidate, cols=1, rows=2.
    assert math.log(1 / 2) == -math.log(2)
    plan = plan_slices(600, 600, max_slice_nums=9)
    assert plan.grid == (1, 2)


def test_plan_fields_are_consistent():
    for width, height in SIZES:
        for max_slice_nums in MAX_SLICE_NUMS:
            plan = plan_slices(width, height, max_slice_nums=max_slice_nums)
            assert plan.original_size == (width, height)
            sizes = [plan.source_size, *plan.slice_sizes]
            assert all(w % P == 0 and h % P == 0 and w > 0 and h > 0 for w, h in sizes)
            assert plan.tgt_sizes == [(h // P, w // P) for w, h in sizes]
            assert plan.num_slices == 1 + len(plan.slice_sizes)
            if plan.grid is None:
                assert plan.refine_size is None and plan.slice_sizes == ()
                continue
            cols, rows = plan.grid
            assert 2 <= cols * rows <= max_slice_nums
            assert len(plan.slice_sizes) == cols * rows
            cell_w, cell_h = plan.slice_sizes[0]
            assert set(plan.slice_sizes) == {(cell_w, cell_h)}
            assert plan.refine_size == (cell_w * cols, cell_h * rows)


def test_small_images_are_never_sliced_and_large_ones_are_unless_capped():
    assert plan_slices(448, 448, max_slice_nums=9).grid is None  # area exactly 448**2
    assert plan_slices(449, 448, max_slice_nums=9).grid is not None
    assert plan_slices(4000, 3000, max_slice_nums=1).grid is None


def test_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    assert plan_slices(np.int64(1920), np.int32(1080), max_slice_nums=np.int64(9)) == plan_slices(
        1920, 1080, max_slice_nums=9
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"width": 0}, "width"),
        ({"height": -3}, "height"),
        ({"width": 10.0}, "width"),
        ({"height": True}, "height"),
        ({"max_slice_nums": 0}, "max_slice_nums"),
        ({"scale_resolution": 0}, "scale_resolution"),
        ({"patch_size": -14}, "patch_size"),
    ],
)
def test_rejects_invalid_arguments(kwargs, name):
    arguments = {"width": 640, "height": 480, "max_slice_nums": 9, **kwargs}
    width, height = arguments.pop("width"), arguments.pop("height")
    with pytest.raises(ValueError, match=name):
        plan_slices(width, height, **arguments)
