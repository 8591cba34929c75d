"""PNG files: A1111 names, atomic never-overwriting writes, the infotext chunk written and read back."""

import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_images import random_rgb
from test_infotext import info

from latentforge import pngfiles
from latentforge.images import ImageError
from latentforge.infotext import format_infotext
from latentforge.pngfiles import check_output_folder, read_infotext, save_png


def only_file(folder):
    names = sorted(os.listdir(folder))
    assert len(names) == 1, names
    return folder / names[0]


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
    monkeypatch.setattr(pngfiles, "next_sequence_number", lambda folder: 0)  # our scan saw an empty folder
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

    monkeypatch.setattr(pngfiles, "_create_temp", refuse)
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
