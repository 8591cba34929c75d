"""`latentforge generate`, `samplers` and `info`: files written, and one-line errors for bad input."""

import numpy as np
import pytest
import test_sdxl
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.infotext import parse_infotext
from latentforge.modelhash import model_hash
from latentforge.pngfiles import read_infotext
from latentforge.samplers import SPECS

# test_sdxl's fixtures, the tiny SDXL base and refiner folders (built once in each module that uses them)
sdxl_folder, refiner_folder = test_sdxl.sdxl_folder, test_sdxl.refiner_folder


@pytest.fixture(scope="module")
def model(sd1_folder):
    return str(sd1_folder)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_with_infotext_and_previews(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "generate", "a red circle", "--model", model, "--steps", "4", "--seed", "42", "--batch-size", "2",
        "--sampler", "DPM++ 2M Karras", "--preview-every", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    paths = stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "00000-42.png", "00001-00000-42-steps.png", "00002-43.png", "00003-00002-43-steps.png"
    ]  # fmt: skip
    params = parse_infotext(read_infotext(paths[2]))
    assert params["Seed"] == "43" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert Image.open(paths[0]).size == (64, 64)
    assert Image.open(paths[1]).size[0] == 2 * 64  # steps 2 and 4 side by side (labels below)

    # a second run never overwrites: new numbers, old bytes untouched
    before = open(paths[0], "rb").read()
    code, stdout, _ = run(capsys, "generate", "a red circle", "--model", model, "--steps", "2", "--seed", "42", "--out", str(out))
    assert code == 0 and stdout.split()[0].endswith("00004-42.png")
    assert open(paths[0], "rb").read() == before

    code, stdout, _ = run(capsys, "info", paths[0])
    assert code == 0 and stdout.startswith("a red circle\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras")


def test_the_hires_pass_previews_are_in_the_strip_at_the_images_size(model, tmp_path, capsys):
    code, stdout, _ = run(
        capsys, "generate", "a red circle", "--model", model, "--steps", "2", "--seed", "4", "--hires-scale", "2",
        "--hires-steps", "4", "--preview-every", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    image, strip = (Image.open(p) for p in stdout.split())
    assert image.size == (128, 128)
    # 2 first-pass frames (enlarged) and the hires pass's int(4 x 0.7) = 2, side by side; the labels above them
    assert strip.width == 4 * 128 and 128 < strip.height < 2 * 128
    first = np.asarray(strip)[-128:, :128]  # a 64 x 64 first-pass frame, each pixel doubled
    assert np.array_equal(first[0::2, 0::2], first[1::2, 1::2])
    assert first.std() > 5  # a picture, not a flat fill that any resize keeps
    assert np.array_equal(np.asarray(strip)[-128:, -128:], np.asarray(image.convert("RGB")))  # the last step's is the image


def test_img2img_and_inpaint_from_the_command_line(model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", model, "--steps", "4", "--seed", "1", "--out", str(tmp_path / "o")]
    code, stdout, _ = run(capsys, "generate", "x", "--init-image", str(tmp_path / "init.png"), "--strength", "0.5", *common)
    assert code == 0 and "Denoising strength: 0.5" in read_infotext(stdout.strip())
    code, stdout, _ = run(
        capsys, "generate", "x", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), *common
    )
    assert code == 0 and stdout.strip().endswith(".png")


def test_samplers_lists_every_sampler(capsys):
    code, stdout, _ = run(capsys, "samplers")
    assert code == 0
    for spec in SPECS:
        assert spec.a1111_name in stdout and spec.name in stdout


def bad_inputs(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (32, 32)).save(tmp_path / "small_mask.png")
    (tmp_path / "a_file").write_text("I am a file")
    return {
        "steps 0": (["--steps", "0"], "steps must be between 1 and 1000"),
        "steps negative": (["--steps", "-3"], "steps must be between 1 and 1000"),
        "strength": (["--init-image", str(tmp_path / "init.png"), "--strength", "1.5"], "strength must be between 0 and 1"),
        "strength zero steps": (["--init-image", str(tmp_path / "init.png"), "--strength", "0.01"], "runs no denoising step"),
        "cfg nan": (["--cfg-scale", "nan"], "cfg_scale must be a finite number"),
        "cfg inf": (["--cfg-scale", "inf"], "cfg_scale must be a finite number"),
        "width": (["--width", "500"], "width must be a multiple of 8, got 500"),
        "height": (["--height", "100"], "height must be a multiple of 8, got 100"),
        "huge": (["--width", "65536", "--height", "65536"], "is too large"),
        "sampler": (["--sampler", "Euler b"], "unknown sampler 'Euler b'"),
        "mask size": (
            ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "small_mask.png")], "32x32"
        ),
        "empty image": (["--init-image", str(tmp_path / "empty.png")], "empty.png"),
        "garbage image": (["--init-image", str(tmp_path / "garbage.png")], "garbage.png"),
        "missing image": (["--init-image", str(tmp_path / "nope.png")], "nope.png"),
        "out is a file": (["--out", str(tmp_path / "a_file")], "a_file"),
        "seed high": (["--seed", str(2**32)], "seed must be between 0 and 4294967295"),
        "seed negative": (["--seed", "-2"], "seed must be between 0 and 4294967295"),
    }


BAD_CASES = [
    "steps 0", "steps negative", "strength", "strength zero steps", "cfg nan", "cfg inf", "width", "height", "huge",
    "sampler", "mask size", "empty image", "garbage image", "missing image", "out is a file", "seed high",
    "seed negative",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(model, tmp_path, capsys, case):
    cases = bad_inputs(tmp_path)
    assert sorted(cases) == sorted(BAD_CASES)
    argv, message = cases[case]
    out = tmp_path / "out"
    argv = ["--out", str(out), *argv] if "--out" not in argv else argv
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "generate", "a red circle", "--model", model, "--steps", "2", *argv)
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stdout == ""
    assert not out.exists() or not any(out.iterdir())  # no PNG written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == [b for b in before if b != "out"]


def test_seed_minus_one_is_random_as_in_a1111(model, tmp_path, capsys):
    seeds = []
    for _ in range(2):
        code, stdout, _ = run(capsys, "generate", "x", "--model", model, "--steps", "1", "--seed", "-1", "--out", str(tmp_path))
        assert code == 0
        seeds.append(int(parse_infotext(read_infotext(stdout.split()[0]))["Seed"]))
    assert all(0 <= seed <= 2**32 - 1 for seed in seeds) and seeds[0] != seeds[1]  # equal once in 2^32 runs
    with pytest.raises(SystemExit):  # argparse's usage line and its error, as for any malformed number
        main(["generate", "x", "--seed", "x"])
    assert "argument --seed: invalid seed value: 'x'" in capsys.readouterr().err


def test_unknown_sampler_error_lists_the_known_ones(model, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model", model, "--sampler", "nope", "--out", str(tmp_path))
    assert code == 2 and "DPM++ 2M Karras" in err and "Euler a" in err


SDXL_SMALL = ["--steps", "4", "--seed", "3", "--width", "64", "--height", "64", "--dtype", "float32", "--device", "cpu"]


def test_generate_with_a_refiner_writes_its_name_and_switch(sdxl_folder, refiner_folder, tmp_path, capsys):
    code, stdout, err = run(
        capsys, "generate", "a red circle", "--model", str(sdxl_folder), "--refiner", str(refiner_folder),
        "--refiner-switch-at", "0.5", *SDXL_SMALL, "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    path = stdout.strip()
    params = parse_infotext(read_infotext(path))
    assert params["Refiner"] == f"{refiner_folder.name} [{model_hash(refiner_folder)}]"
    assert params["Refiner switch at"] == "0.5"
    # the library's image for the same call: the refiner and its switch reached generate
    base = latentforge.load(sdxl_folder, dtype="float32", device="cpu")
    refiner = latentforge.load(refiner_folder, dtype="float32", device="cpu")
    want = base.generate("a red circle", steps=4, seed=3, width=64, height=64, refiner=refiner, refiner_switch_at=0.5)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(want[0]))
    code, stdout, _ = run(capsys, "info", path)
    assert code == 0 and f"Refiner: {params['Refiner']}, Refiner switch at: 0.5" in stdout


@pytest.mark.parametrize(
    "model, argv, message",
    [
        (None, [], "works in another latent space"),  # the shipped SD 1.x model
        ("sdxl", ["--refiner-switch-at", "1.5"], "refiner_switch_at must be a fraction between 0 and 1"),
    ],
)
def test_refiner_misuse_is_one_line(sdxl_folder, refiner_folder, tmp_path, capsys, model, argv, message):
    given = ["--model", str(sdxl_folder)] if model == "sdxl" else []
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "generate", "x", *given, "--refiner", str(refiner_folder), *argv, "--steps", "2", "--out", str(out)
    )
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and stdout == ""
    assert not out.exists() or not any(out.iterdir())
