"""Images on disk: A1111 infotext, PNG writing (names, atomicity), reading inputs, tensors vs diffusers."""

import hashlib
import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import images
from latentforge.weightfiles import CheckpointError
from latentforge.images import (
    GenerationInfo,
    ImageError,
    check_output_folder,
    format_infotext,
    image_strip,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    model_hash,
    parse_infotext,
    read_infotext,
    save_png,
    tensor_to_images,
)


def info(**overrides) -> GenerationInfo:
    fields = dict(
        prompt="a photo of a cat, (masterpiece:1.2)",
        steps=20,
        sampler="Euler a",
        schedule_type="Automatic",
        cfg_scale=7.0,
        seed=1234,
        width=512,
        height=512,
        model_hash="abcdef1234",
        model_name="v1-5-pruned-emaonly",
        version="latentforge 0.1.0",
    )
    return GenerationInfo(**{**fields, **overrides})


def random_rgb(width=64, height=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def only_file(folder):
    names = sorted(os.listdir(folder))
    assert len(names) == 1, names
    return folder / names[0]


# --------------------------------------------------------------------------- infotext: writing


def test_infotext_txt2img_without_negative_prompt():
    assert format_infotext(info()) == (
        "a photo of a cat, (masterpiece:1.2)\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef1234, Model: v1-5-pruned-emaonly, Version: latentforge 0.1.0"
    )


def test_infotext_img2img_with_negative_prompt_and_extras_in_a1111_order():
    text = format_infotext(
        info(
            negative_prompt="blurry, lowres",
            sampler="DPM++ 2M",
            schedule_type="Karras",
            cfg_scale=7.5,
            width=768,
            height=512,
            denoising_strength=0.75,
            clip_skip=2,
            mask_blur=4,
        )
    )
    assert text == (
        "a photo of a cat, (masterpiece:1.2)\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 768x512, "
        "Model hash: abcdef1234, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, "
        "Mask blur: 4, Version: latentforge 0.1.0"
    )


def test_infotext_leaves_out_what_does_not_apply():
    text = format_infotext(info(model_hash="", model_name=None, clip_skip=1, version=None, denoising_strength=1.0))
    assert text.splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Denoising strength: 1"
    )


def test_infotext_quotes_values_as_a1111_does():
    extra = {"Lora hashes": "a: 1, b: 2", "Note": 'say "hi"'}
    text = format_infotext(info(model_name="my model, v2: final", extra=extra))
    last = text.splitlines()[-1]
    # json.dumps(ensure_ascii=False) for ",", ":" or a newline; a bare '"' alone is written as it is
    assert 'Model: "my model, v2: final"' in last
    assert 'Lora hashes: "a: 1, b: 2", Note: say "hi", Version: latentforge 0.1.0' in last
    assert format_infotext(info(model_name="ü: 猫")).splitlines()[-1].count('Model: "ü: 猫"') == 1


def test_infotext_extra_keys_keep_a1111_positions():
    # a key the webui places itself keeps its place even when it arrives as an extra
    text = format_infotext(info(extra={"Hires upscale": 2, "Denoising strength": 0.5}, version=None))
    assert text.endswith("Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Hires upscale: 2")


# --------------------------------------------------------------------------- infotext: reading


@pytest.mark.parametrize(
    "case",
    [
        info(),
        info(negative_prompt="ugly, blurry"),
        info(prompt="line one\nline two, with: colon", negative_prompt="neg one\nneg two"),
        info(model_name='model, with "quotes": yes', denoising_strength=0.35, clip_skip=2, mask_blur=8),
        info(prompt="一只猫 🐱", negative_prompt="ß", model_name="ünïcode", cfg_scale=4.5, seed=4294967295),
        info(model_name='"quoted"', sampler="DPM++ 2M SDE", schedule_type="Exponential"),
    ],
)
def test_format_then_parse_round_trip(case):
    parsed = parse_infotext(format_infotext(case))
    assert parsed["Prompt"] == case.prompt
    assert parsed["Negative prompt"] == case.negative_prompt
    assert parsed["Steps"] == str(case.steps)
    assert parsed["Sampler"] == case.sampler
    assert parsed["Schedule type"] == case.schedule_type
    assert float(parsed["CFG scale"]) == case.cfg_scale
    assert int(parsed["Seed"]) == case.seed
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(case.width), str(case.height))
    assert parsed["Model hash"] == case.model_hash
    assert parsed["Model"] == case.model_name
    assert parsed["Version"] == case.version
    if case.denoising_strength is not None:
        assert float(parsed["Denoising strength"]) == case.denoising_strength
    assert parsed.get("Clip skip", "1") == str(case.clip_skip)
    if case.mask_blur is not None:
        assert parsed["Mask blur"] == str(case.mask_blur)


def test_parse_a1111_infotext():
    # the example in the webui's parse_generation_parameters docstring, plus a quoted value
    text = (
        "girl with an artist's beret, determined, blue eyes\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, '
        'Lora hashes: "add_detail: 7c6bad76eb54", Seed resize from: 768x640'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "girl with an artist's beret, determined, blue eyes"
    assert parsed["Negative prompt"] == "ugly, fat, (((deformed))), [blurry]"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "Euler a" and parsed["CFG scale"] == "7"
    assert parsed["Model hash"] == "45dee52b"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("768", "640")
    assert "Size" not in parsed


def test_parse_last_line_with_few_pairs_is_prompt():
    parsed = parse_infotext("a cat\nstyle: watercolor, mood: calm")
    assert parsed == {"Prompt": "a cat\nstyle: watercolor, mood: calm", "Negative prompt": ""}


# --------------------------------------------------------------------------- model hash


def test_model_hash_of_a_file_is_a1111_short_sha256(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB blocks and a partial one
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]


def test_model_hash_of_a_folder_hashes_weight_files_in_sorted_order(tmp_path):
    files = {
        "vae/diffusion_pytorch_model.safetensors": b"vae",
        "unet/diffusion_pytorch_model.safetensors": b"unet",
        "text_encoder/model.safetensors": b"text",
        "unet/config.json": b"{}",  # not weights
        ".cache/x.safetensors": b"hidden",  # skipped
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert model_hash(tmp_path) == hashlib.sha256(b"text" + b"unet" + b"vae").hexdigest()[:10]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weight files"):
        model_hash(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        model_hash(tmp_path / "missing.ckpt")


def test_model_hash_is_remembered_across_calls_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(images.HASH_CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first weights")
    calls = []
    real = images.model_hash
    monkeypatch.setattr(images, "model_hash", lambda p: calls.append(p) or real(p))
    first = images.cached_model_hash(path)
    assert first == hashlib.sha256(b"first weights").hexdigest()[:10] and len(calls) == 1
    assert images.cached_model_hash(path) == first and len(calls) == 1  # read back, not hashed again
    path.write_bytes(b"other weights, another size")
    assert images.cached_model_hash(path) == hashlib.sha256(b"other weights, another size").hexdigest()[:10]
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_model_hash_cache_that_cannot_be_used_is_ignored(tmp_path, monkeypatch, damage):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    if damage == "corrupt":
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "model-hashes.json").write_text("{not json")
    else:  # the cache folder's place is taken by a file
        cache = tmp_path / "a-file"
        cache.write_text("")
    monkeypatch.setenv(images.HASH_CACHE_ENV, str(cache))
    assert images.cached_model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
    if damage == "corrupt":  # rewritten whole
        assert images.cached_model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
        assert "model.safetensors" in (cache / "model-hashes.json").read_text()


# --------------------------------------------------------------------------- PNG writing


def test_third_party_parser_reads_our_png(tmp_path):
    import sd_parsers  # in the `test` extra: a missing install fails here rather than skipping
    case = info(negative_prompt="blurry, lowres", sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=6.5, seed=42)
    path = save_png(random_rgb(), tmp_path, case)
    parsed = sd_parsers.ParserManager().parse(path)
    assert parsed is not None and parsed.generator.value == "AUTOMATIC1111"
    assert [str(p) for p in parsed.prompts] == [case.prompt]
    assert [str(p) for p in parsed.negative_prompts] == [case.negative_prompt]
    (sampler,) = parsed.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["seed"] == "42"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "6.5"
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.model.hash == "abcdef1234" and sampler.model.name == "v1-5-pruned-emaonly"


def test_png_text_chunk_latin1_and_itxt(tmp_path):
    latin = save_png(random_rgb(), tmp_path, info(prompt="café"))
    assert b"tEXtparameters\0" in latin.read_bytes()
    wide = save_png(random_rgb(), tmp_path, info(prompt="一只猫", negative_prompt="ぼやけた"))
    assert b"iTXtparameters\0" in wide.read_bytes()
    with Image.open(wide) as image:
        assert image.info["parameters"] == format_infotext(info(prompt="一只猫", negative_prompt="ぼやけた"))
    assert read_infotext(wide) == image.info["parameters"]
    import sd_parsers  # in the `test` extra: a missing install fails here rather than skipping
    assert [str(p) for p in sd_parsers.ParserManager().parse(wide).prompts] == ["一只猫"]


def test_png_pixels_are_kept(tmp_path):
    image = random_rgb(seed=3)
    path = save_png(image, tmp_path, info())
    with Image.open(path) as back:
        assert back.mode == "RGB" and np.array_equal(np.array(back), np.array(image))


def test_names_are_a1111_numbered_and_never_overwrite(tmp_path):
    old = tmp_path / "00000-1234.png"
    old.write_bytes(b"somebody else's image")
    (tmp_path / "00003-99-steps.png").write_bytes(b"x")
    (tmp_path / "grid-0007.png").write_bytes(b"x")  # not counted, as in the webui
    first = save_png(random_rgb(), tmp_path, info())
    assert first.name == "00004-1234.png"
    assert save_png(random_rgb(), tmp_path, info(seed=5)).name == "00005-5.png"
    assert save_png(random_rgb(), tmp_path, info(), stem="custom").name == "00006-custom.png"
    assert old.read_bytes() == b"somebody else's image"


def test_a_name_taken_meanwhile_is_skipped(tmp_path, monkeypatch):
    taken = tmp_path / "00000-1234.png"
    taken.write_bytes(b"written by another process after our scan")
    monkeypatch.setattr(images, "next_sequence_number", lambda folder: 0)  # our scan saw an empty folder
    path = save_png(random_rgb(), tmp_path, info())
    assert path.name == "00001-1234.png"
    assert taken.read_bytes() == b"written by another process after our scan"


def test_concurrent_writers_get_distinct_names(tmp_path):
    barrier = threading.Barrier(6)

    def write(i):
        barrier.wait()
        return [save_png(random_rgb(16, 16, i), tmp_path, info(seed=7)) for _ in range(4)]

    with ThreadPoolExecutor(6) as pool:
        paths = [p for batch in pool.map(write, range(6)) for p in batch]
    assert len(set(paths)) == 24
    assert sorted(os.listdir(tmp_path)) == [f"{n:05}-7.png" for n in range(24)]


def test_save_png_from_image_info_and_parameters(tmp_path):
    image = random_rgb()
    image.info["parameters"] = format_infotext(info(seed=77))
    path = save_png(image, tmp_path)  # as Pipeline.generate's images are saved
    assert path.name == "00000-77.png" and read_infotext(path) == image.info["parameters"]
    strip = save_png(random_rgb(), tmp_path, stem=path.stem + "-steps", parameters=image.info["parameters"])
    assert strip.name == "00001-00000-77-steps.png" and read_infotext(strip) == image.info["parameters"]
    bare = save_png(random_rgb(), tmp_path)
    assert bare.name == "00002.png" and read_infotext(bare) is None
    assert save_png(random_rgb(), tmp_path, info(), stem="../a/b").name == "00003-.._a_b.png"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch, error):
    def broken_encoder(image, file, filename):
        file.write(b"\x89PNG\r\n\x1a\n half an image")
        raise error

    monkeypatch.setitem(Image.SAVE, "PNG", broken_encoder)
    expected = ImageError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        save_png(random_rgb(), tmp_path, info())
    assert os.listdir(tmp_path) == []  # no PNG, no temp file
    if expected is ImageError:
        assert str(tmp_path) in str(caught.value) and "No space left" in str(caught.value)


def test_output_folder_checks(tmp_path, monkeypatch):
    created = check_output_folder(tmp_path / "new" / "nested")
    assert created.is_dir() and os.listdir(created) == []
    a_file = tmp_path / "outputs"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=r"outputs: is a file, not a folder; choose another output folder") as caught:
        check_output_folder(a_file)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(ImageError, match="a file is in the way"):
        check_output_folder(a_file / "sub")

    def refuse(folder, suffix):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "_create_temp", refuse)
    with pytest.raises(ImageError, match=r"not writable \(Permission denied\); choose another output folder"):
        check_output_folder(tmp_path)


# --------------------------------------------------------------------------- PNG reading


def png_with_chunks(*chunks: tuple[bytes, bytes], after_idat: bool = False) -> bytes:
    """A 1x1 PNG with extra chunks, put before or after the image data."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    extra = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)
    at = data.rindex(b"IEND") - 4 if after_idat else 33  # after IHDR
    return data[:at] + extra + data[at:]


def test_read_infotext_variants(tmp_path):
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1"
    cases = {
        "after.png": png_with_chunks((b"tEXt", b"parameters\0" + text.encode()), after_idat=True),
        "ztxt.png": png_with_chunks((b"zTXt", b"parameters\0\0" + zlib.compress(text.encode()))),
        "itxt.png": png_with_chunks((b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(text.encode()))),
        "other.png": png_with_chunks((b"tEXt", b"Comment\0hello")),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert read_infotext(tmp_path / "after.png") == text
    assert read_infotext(tmp_path / "ztxt.png") == text
    assert read_infotext(tmp_path / "itxt.png") == text
    assert read_infotext(tmp_path / "other.png") is None
    random_rgb().save(tmp_path / "a.jpg")
    assert read_infotext(tmp_path / "a.jpg") is None
    cut = cases["ztxt.png"][: cases["ztxt.png"].index(b"IDAT") + 10]  # cut short after the text, which stays
    (tmp_path / "cut.png").write_bytes(cut)
    assert read_infotext(tmp_path / "cut.png") == text
    (tmp_path / "cut2.png").write_bytes(cases["other.png"][:50])
    with pytest.raises(ImageError, match="cut2.png: PNG is cut short"):
        read_infotext(tmp_path / "cut2.png")


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

