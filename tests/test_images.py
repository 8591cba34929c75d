"""Input images and masks (checked before decoding), tensors vs diffusers, preview strips."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from latentforge.images import (
    ImageError,
    declared_size,
    image_strip,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    tensor_to_images,
)


def random_rgb(width=64, height=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- input images


def bomb_png(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR is patched (with a valid CRC) to declare width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(str(path) + ": ") and "\n" not in message
    return message


def test_load_image_errors(tmp_path):
    assert_one_line_error(tmp_path / "missing.png", "no such file")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.png", r"empty file \(0 bytes\)")
    (tmp_path / "noise.png").write_bytes(os.urandom(1000))
    assert_one_line_error(tmp_path / "noise.png", "not an image file")
    buffer = io.BytesIO()
    random_rgb(256, 256).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:2000])
    assert_one_line_error(tmp_path / "cut.png", "cannot decode image")
    assert_one_line_error(tmp_path, "is a folder")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    assert_one_line_error(tmp_path / "bomb.png", "header declares 100000x100000, more than 67108864 pixels")
    # below Pillow's own limits: our max_pixels refuses it, before decoding (which would fail otherwise)
    (tmp_path / "big.png").write_bytes(bomb_png(9000, 9000))
    assert_one_line_error(tmp_path / "big.png", "header declares 9000x9000")
    with pytest.raises(ImageError, match="bomb.png: header declares 100000x100000, more than Pillow's limit"):
        load_image(tmp_path / "bomb.png", max_pixels=None)  # Pillow's own ceiling still holds
    random_rgb(64, 64).save(tmp_path / "photo.jpg")
    with pytest.raises(ImageError, match="photo.jpg: header declares 64x64, more than 1000 pixels"):
        load_image(tmp_path / "photo.jpg", max_pixels=1000)


def test_declared_size_reads_headers_only(tmp_path, monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image))
    (tmp_path / "big.png").write_bytes(bomb_png(8192, 8192))  # 8 x 8 pixels of data
    random_rgb(40, 24).save(tmp_path / "photo.jpg")
    assert declared_size(tmp_path / "big.png") == (8192, 8192)
    assert declared_size(tmp_path / "photo.jpg", max_pixels=40 * 24) == (40, 24)
    with pytest.raises(ImageError, match="photo.jpg: header declares 40x24, more than 959 pixels"):
        declared_size(tmp_path / "photo.jpg", max_pixels=40 * 24 - 1)
    assert decoded == []


def test_load_image_modes_and_rotation(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.mode == "RGB" and loaded.size == (20, 10) and loaded.getpixel((0, 0)) == (10, 20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    random_rgb(40, 24).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (24, 40)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert np.array(load_mask(tmp_path / "deep.png", (4, 1))).tolist() == [[0, 64, 128, 255]]
    assert np.array(load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 64, 128, 255]


def test_load_mask(tmp_path):
    Image.new("L", (64, 48), 255).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", (64, 48))
    assert mask.mode == "L" and mask.size == (64, 48)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"small.png: mask is 32x32 but the image is 64x48; make the mask"):
        load_mask(tmp_path / "small.png", (64, 48))
    with pytest.raises(ValueError, match="no such file"):
        load_mask(tmp_path / "none.png", (64, 48))


# --------------------------------------------------------------------------- tensors


def test_image_to_tensor_matches_diffusers_preprocess():
    from diffusers.image_processor import VaeImageProcessor

    image = random_rgb(64, 48)
    ours = image_to_tensor(image)
    assert ours.shape == (1, 3, 48, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, VaeImageProcessor().preprocess(image))
    assert ours.min() >= -1 and ours.max() <= 1


def test_mask_to_tensor_matches_diffusers_mask_processor():
    from diffusers.image_processor import VaeImageProcessor

    values = np.tile(np.arange(256, dtype=np.uint8), (16, 1))[:, ::4]  # 16 x 64, every level class
    values[0, :2] = (127, 128)  # the threshold: 127/255 < 0.5 <= 128/255
    mask = Image.fromarray(values)
    ours = mask_to_tensor(mask)
    theirs = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).preprocess(mask)
    assert ours.shape == (1, 1, 16, 64) and torch.equal(ours, theirs)
    assert ours[0, 0, 0, 0] == 0 and ours[0, 0, 0, 1] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_to_images_matches_diffusers_postprocess(dtype):
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 3, 24, 40, generator=g) * 0.8).to(dtype)  # some values outside [-1, 1]
    # exact half-way points of the uint8 rounding, where round-half-to-even matters
    x[0, 0, 0, :4] = torch.tensor([0.5 / 255 * 2 - 1, 1.5 / 255 * 2 - 1, 2.5 / 255 * 2 - 1, -1.0], dtype=dtype)
    ours = tensor_to_images(x)
    theirs = VaeImageProcessor().postprocess(x, output_type="pil")
    assert len(ours) == 3
    for a, b in zip(ours, theirs):
        assert a.mode == b.mode == "RGB" and a.size == (40, 24)
        assert np.array_equal(np.array(a), np.array(b))


def test_image_tensor_round_trip_is_exact():
    image = random_rgb(64, 48, seed=5)
    (back,) = tensor_to_images(image_to_tensor(image))
    assert np.array_equal(np.array(back), np.array(image))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tensor_to_images(torch.zeros(3, 8, 8))


def test_image_strip():
    a, b = Image.new("RGB", (30, 20), "red"), Image.new("L", (10, 16), 255)
    plain = image_strip([a, b])
    assert plain.size == (40, 20) and plain.getpixel((0, 0)) == (255, 0, 0) and plain.getpixel((35, 5)) == (255,) * 3
    labelled = image_strip([a, b], ["step 5", "step 10 is a long label"])
    band = labelled.height - 20
    assert labelled.width == 40 and band > 0
    assert labelled.getpixel((29, band)) == (255, 0, 0) and labelled.getpixel((39, band + 15)) == (255,) * 3
    assert np.array(labelled)[:band].max() > 0  # some text was drawn
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        image_strip([a, b], ["x"])
    with pytest.raises(ValueError, match="at least one"):
        image_strip([])
