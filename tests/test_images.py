"""The pixel path: opening files, slicing, normalisation and the patch-strip layout."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as photos

from finetune.data import images
from finetune.data.images import (
    ImageError,
    open_image,
    preprocess_image,
    slice_image,
    to_patch_strips,
)
from finetune.data.slicing import plan_slices
from finetune.models.minicpmv import normalize_pixels

P = 14


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(photos.coffee())  # 600x400 RGB photo: sliced


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(photos.astronaut())  # 512x512 RGB photo: sliced into 1x2


def _slow_strip(image: torch.Tensor) -> torch.Tensor:
    """Strip layout the slow, obvious way: copy each patch of a [3, H, W] image, row-major, side by side."""
    _, height, width = image.shape
    patches = [
        image[:, row : row + P, col : col + P] for row in range(0, height, P) for col in range(0, width, P)
    ]
    return torch.cat(patches, dim=2)


def _reference_reshape_by_patch(image: torch.Tensor) -> torch.Tensor:
    """Transcription of the reference `reshape_by_patch` (F.unfold based)."""
    patches = F.unfold(image, (P, P), stride=(P, P))
    patches = patches.reshape(image.size(0), P, P, -1)
    return patches.permute(0, 1, 3, 2).reshape(image.size(0), P, -1)


def _reference_transform(pixels: torch.Tensor) -> torch.Tensor:
    """The reference's ToTensor + Normalize(0.5, 0.5) of uint8 [H, W, 3], in float32: [3, H, W]."""
    return pixels.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def _random_pixels(height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)


# --- Strip layout ----------------------------------------------------------------------


def test_strip_equals_per_patch_copy_and_reference_unfold():
    slices = [_random_pixels(3 * P, 5 * P), _random_pixels(2 * P, 2 * P), _random_pixels(P, 7 * P)]
    pixel_values, tgt_sizes = to_patch_strips(slices)

    assert pixel_values.shape == (3, P, 15 * P, 3) and pixel_values.dtype == torch.uint8
    assert tgt_sizes.tolist() == [[3, 5], [2, 2], [1, 7]] and tgt_sizes.dtype == torch.long
    for strip, pixels, (h, w) in zip(pixel_values, slices, tgt_sizes.tolist()):
        used = strip[:, : h * w * P].permute(2, 0, 1)  # channels first, as the reference lays it out
        assert torch.equal(used, _slow_strip(pixels.permute(2, 0, 1)))
        assert torch.equal(used.float(), _reference_reshape_by_patch(pixels.permute(2, 0, 1).float()))


def test_cells_cut_from_a_larger_image_lay_out_like_copies(astronaut):
    # slice_image hands out grid cells as views of one refined array (strided, not contiguous).
    pixels = torch.from_numpy(np.array(astronaut))
    cell = pixels[P : 4 * P, 2 * P : 7 * P]
    assert not cell.is_contiguous()
    assert torch.equal(to_patch_strips([cell])[0], to_patch_strips([cell.contiguous()])[0])


def test_padded_tail_is_zero():
    long, short = torch.full((2 * P, 3 * P, 3), 255, dtype=torch.uint8), torch.full((P, 2 * P, 3), 255, dtype=torch.uint8)
    pixel_values, _ = to_patch_strips([long, short])
    assert torch.all(pixel_values[0] == 255)
    assert torch.all(pixel_values[1, :, : 2 * P] == 255)
    assert torch.all(pixel_values[1, :, 2 * P :] == 0)


def test_patch_conv_on_strip_equals_conv_on_image():
    # The vision encoder's patch embedding is a conv with kernel = stride = P; on the
    # strip it must produce the image's patches in row-major order (spec 2.2).
    pixels = _random_pixels(3 * P, 4 * P)
    weight = torch.randn(8, 3, P, P, dtype=torch.float64)  # float64: sums agree to 1e-9
    strip = to_patch_strips([pixels])[0].permute(0, 3, 1, 2).double()  # [1, 3, P, 12*P]
    image = pixels.permute(2, 0, 1)[None].double()
    on_image = F.conv2d(image, weight, stride=P).flatten(2)  # [1, 8, 3*4] row-major
    on_strip = F.conv2d(strip, weight, stride=P).flatten(2)  # [1, 8, 12]
    torch.testing.assert_close(on_strip, on_image, rtol=0, atol=1e-9)


def test_no_slices_gives_empty_batch():
    pixel_values, tgt_sizes = to_patch_strips([])
    assert pixel_values.shape == (0, P, 0, 3) and pixel_values.dtype == torch.uint8
    assert tgt_sizes.shape == (0, 2) and tgt_sizes.dtype == torch.long


@pytest.mark.parametrize("shape", [(15, 14, 3), (14, 13, 3), (14, 14, 1), (0, 14, 3), (3, 14, 14), (14, 14)])
def test_rejects_slices_that_do_not_tile(shape):
    with pytest.raises(ValueError, match="slice 1"):
        to_patch_strips([_random_pixels(P, P), torch.zeros(shape, dtype=torch.uint8)])


def test_rejects_float_slices():
    with pytest.raises(ValueError, match="slice 0 is torch.float32"):
        to_patch_strips([torch.zeros(P, P, 3)])


# --- Normalisation (the model's first operation) ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalised_strips_equal_the_reference_float_pipeline_bit_for_bit(dtype):
    # Every uint8 value, in slices of different lengths: the reference normalises each slice in
    # float32 (ToTensor + Normalize), lays it out with unfold, pads with 0.0, and casts.
    values = torch.arange(256, dtype=torch.uint8)
    slices = [values.repeat(3 * P * 5 * P * 3 // 256 + 1)[: 3 * P * 5 * P * 3].view(3 * P, 5 * P, 3),
              _random_pixels(P, 2 * P), _random_pixels(2 * P, 2 * P)]
    pixel_values, tgt_sizes = to_patch_strips(slices)

    normalised = normalize_pixels(pixel_values, tgt_sizes, dtype)
    assert normalised.dtype == dtype and normalised.shape == (3, 3, P, 5 * 3 * P)
    for row, pixels in enumerate(slices):
        want = _reference_reshape_by_patch(_reference_transform(pixels)).to(dtype)
        length = want.shape[-1]
        assert torch.equal(normalised[row, :, :, :length], want), f"slice {row}"
        assert torch.all(normalised[row, :, :, length:] == 0), f"padding of slice {row}"
    assert normalised.min() == -1 and normalised.max() == 1  # 0 -> -1, 255 -> 1 exactly


def test_normalisation_refuses_float_strips():
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(torch.zeros(1, P, P, 3), torch.tensor([[1, 1]]), torch.float32)


# --- Slicing pixels ------------------------------------------------------------------------


def test_non_rgb_images_are_converted(astronaut):
    gray = astronaut.convert("L")
    plan, (source, *_) = preprocess_image(gray, max_slice_nums=9)
    assert source.shape == (plan.source_size[1], plan.source_size[0], 3)
    assert torch.equal(source[..., 0], source[..., 1]) and torch.equal(source[..., 1], source[..., 2])


@pytest.mark.parametrize("max_slice_nums", [1, 2, 9])
def test_preprocess_shapes_follow_the_plan(coffee, astronaut, max_slice_nums):
    for photo in (coffee, astronaut, coffee.resize((300, 200))):
        plan, slices = preprocess_image(photo, max_slice_nums=max_slice_nums)
        assert plan == plan_slices(*photo.size, max_slice_nums=max_slice_nums)
        assert len(slices) == plan.num_slices
        for pixels, (w, h) in zip(slices, [plan.source_size, *plan.slice_sizes]):
            assert pixels.shape == (h, w, 3) and pixels.dtype == torch.uint8
        _, tgt_sizes = to_patch_strips(slices)
        assert tgt_sizes.tolist() == [list(size) for size in plan.tgt_sizes]


def test_photos_exercise_both_branches(coffee, astronaut):
    assert plan_slices(*coffee.size, max_slice_nums=9).grid is not None
    assert plan_slices(*astronaut.size, max_slice_nums=9).grid == (1, 2)
    assert plan_slices(300, 200, max_slice_nums=9).grid is None


def test_slice_image_resizes_source_and_crops_one_refined_image(coffee):
    photo = coffee.resize((1200, 800))  # area 4.8 * 448**2 -> a 3x2 grid: rows and columns
    plan = plan_slices(*photo.size, max_slice_nums=9)
    assert plan.grid == (3, 2)
    source, *cells = slice_image(photo, plan)

    assert np.array_equal(source.numpy(), np.asarray(photo.resize(plan.source_size, Image.BICUBIC)))
    # Pasting the cells back row by row must rebuild the single refined resize exactly:
    # that checks the cut order and that cells are not resized one by one.
    cols, rows = plan.grid
    cell_w, cell_h = plan.slice_sizes[0]
    assert [(cell.shape[1], cell.shape[0]) for cell in cells] == list(plan.slice_sizes)
    canvas = torch.zeros(plan.refine_size[1], plan.refine_size[0], 3, dtype=torch.uint8)
    for index, cell in enumerate(cells):
        row, col = divmod(index, cols)
        canvas[row * cell_h : (row + 1) * cell_h, col * cell_w : (col + 1) * cell_w] = cell
    assert np.array_equal(canvas.numpy(), np.asarray(photo.resize(plan.refine_size, Image.BICUBIC)))


def test_unsliced_image_is_only_resized(coffee):
    small = coffee.resize((300, 200))
    plan = plan_slices(*small.size, max_slice_nums=9)
    (source,) = slice_image(small, plan)
    assert np.array_equal(source.numpy(), np.asarray(small.resize(plan.source_size, Image.BICUBIC)))


def test_slice_image_rejects_a_plan_for_another_size(coffee):
    with pytest.raises(ValueError, match="does not match"):
        slice_image(coffee, plan_slices(100, 100, max_slice_nums=9))


# --- Opening files -----------------------------------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk is rewritten to claim width x height (CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    # Signature (8) + chunk length (4) + b"IHDR" (4), then width and height (big-endian).
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_open_image_returns_rgb(tmp_path, astronaut):
    path = tmp_path / "rgba.png"
    astronaut.convert("RGBA").save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert np.array_equal(np.asarray(image), np.asarray(astronaut))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.jpg", "not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.png", b""), "is empty"),
        (lambda d: _write(d / "garbage.jpg", bytes(range(256)) * 4), "not an image"),
        (lambda d: _write(d / "truncated.png", _png_bytes()[:-300]), "corrupt or truncated"),
        (lambda d: _write(d / "tall.png", _png_header_claiming(9_000, 9_000)), "too large"),
        (lambda d: _write(d / "bomb.png", _png_header_claiming(30_000, 30_000)), "too large"),
    ],
    ids=["missing", "directory", "empty", "garbage", "truncated", "over-limit", "pil-bomb"],
)
def test_open_image_errors(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError) as caught:
        open_image(path)
    error = caught.value
    assert reason in error.reason and str(path) in error.reason
    assert error.fix and error.fix in str(error) and "\n" not in str(error)
    assert error.__cause__ is None  # no chained PIL traceback to show


def test_image_error_survives_pickling():
    # Data-loader workers send exceptions to the main process by pickling.
    error = pickle.loads(pickle.dumps(ImageError("image file is empty: a.png", "re-export it")))
    assert (error.reason, error.fix) == ("image file is empty: a.png", "re-export it")
    assert str(error) == "image file is empty: a.png (re-export it)"


def test_size_limit_is_the_module_constant(tmp_path, monkeypatch):
    path = _write(tmp_path / "small.png", _png_bytes())  # 64x64
    assert open_image(path).size == (64, 64)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS = 4,095"):
        open_image(path)


def test_pil_bomb_warning_becomes_our_error_only(tmp_path):
    # 10000x10000 = 1e8 pixels is above PIL's warning threshold (~89.5M) but below its
    # error threshold: the user should see one ImageError and no PIL warning.
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    path = _write(tmp_path / "big.png", _png_header_claiming(10_000, 10_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="too large"):
            open_image(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")  # noise: no compression, long IDAT
    return buffer.getvalue()


def _write(path, content: bytes):
    path.write_bytes(content)
    return path
