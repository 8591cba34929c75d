"""Every user input to `latentforge generate/inspect/convert/info` that cannot be used is exit status 2 and one
line on stderr naming it, never a traceback (the cases found by going through each argument; more in
tests/test_cli_generate.py)."""

import os

import pytest
import torch
from PIL import Image

from latentforge import pipeline
from latentforge.cli import main
from latentforge.pipeline import DEFAULT_MODEL


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "step/s" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    return tmp_path


GENERATE = {
    "mask without init": (["--mask", "{}/mask.png"], "--mask needs --init-image"),
    "negative preview": (["--preview-every", "-1"], "--preview-every must be a number of steps, or 0 for none; got -1"),
    "cfg 1e308": (["--cfg-scale", "1e308"], "cfg_scale must be between 0 and 100, got 1e+308"),
    "cfg negative": (["--cfg-scale", "-2"], "cfg_scale must be between 0 and 100, got -2"),
    "width 0": (["--width", "0"], "width must be between 8 and 4096, got 0"),
    "height 0": (["--height", "0"], "height must be between 8 and 4096, got 0"),
    "long side": (["--width", "65536", "--height", "64"], "width 65536 is too large: at most 4096 pixels a side"),
    "too many pixels": (["--width", "4096", "--height", "4096", "--device", "cpu"], "at most 4,194,304 pixels (2048x2048)"),
    "long prompt": (["--negative-prompt", "x" * 16_001], "negative_prompt is 16,001 characters long"),
    "init image a folder": (["--init-image", "{}/a_folder"], "a_folder: is a folder, not an image file"),
    "mask a folder": (["--init-image", "{}/init.png", "--mask", "{}/a_folder"], "a_folder: is a folder"),
    "model a folder": (["--model", "{}/a_folder"], "model_index.json: missing"),
    "model not weights": (["--model", "{}/init.png"], "init.png: unknown format"),
    "device unknown": (["--device", "tpu9"], "unknown device 'tpu9'"),
    "device unsupported": (["--device", "meta"], "device 'meta' is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "dtype": (["--dtype", "float8"], "unknown dtype 'float8'"),
    "batch 0": (["--batch-size", "0"], "batch_size must be between 1 and 64, got 0"),
    "clip skip": (["--clip-skip", "0"], "clip_skip must be between 1 and"),
    "subseed strength": (["--subseed-strength", "2"], "subseed_strength must be between 0 and 1 (0: no variation), got 2"),
    "seed resize not WxH": (["--seed-resize-from", "512"], "--seed-resize-from 512: write WIDTHxHEIGHT, e.g. 512x768"),
    "seed resize not x8": (["--seed-resize-from", "50x64"], "seed_resize_from's width must be a multiple of 8, got 50"),
}


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate_refuses_unusable_input_in_one_line(files, capsys, case):
    argv, message = GENERATE[case]
    argv = [a.replace("{}", str(files)) for a in argv]
    code, out, err = run(capsys, "generate", "a red circle", "--steps", "1", "--out", files / "out", *argv)
    assert_one_line_error(code, err, message)
    assert out == "" and not any((files / "out").glob("*.png"))


def test_cuda_device_that_this_machine_lacks(monkeypatch, capsys, tmp_path):
    """No GPU, or an index past the GPUs there are: one line saying so (was an AssertionError from torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "generate", "x", "--device", "cuda", "--out", tmp_path)
    assert_one_line_error(code, err, "device 'cuda': PyTorch sees no CUDA GPU on this machine; use 'cpu' or 'auto'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        pipeline.resolve_device("cuda:2")
    assert pipeline.resolve_device("cuda:1") == torch.device("cuda", 1)


CONVERT = {
    "into a missing folder": ("{}/missing/model.safetensors", "the folder {}/missing does not exist; create it first"),
    "under a file": ("{}/a_file/model.safetensors", "{}/a_file is a file, not a folder"),
    "folder under a file": ("{}/a_file/deeper/model", "{}/a_file is a file, not a folder"),
    "existing": ("{}/a_folder", "already exists"),
    "single not safetensors": ("{}/model.ckpt", "name it model.ckpt.safetensors"),
}


@pytest.mark.parametrize("case", sorted(CONVERT))
def test_convert_refuses_a_bad_destination_before_reading(files, capsys, monkeypatch, case):
    dst, message = (text.replace("{}", str(files)) for text in CONVERT[case])
    monkeypatch.setattr("latentforge.checkpoints.read_checkpoint", lambda *a: pytest.fail("read before checking DST"))
    to = ["--to", "single"] if case == "single not safetensors" else []
    code, _, err = run(capsys, "convert", DEFAULT_MODEL, dst, *to)
    assert_one_line_error(code, err, message)


def test_convert_into_a_read_only_folder(files, capsys, monkeypatch):
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes anywhere: pretend
    else:
        (files / "a_folder").chmod(0o500)
    code, _, err = run(capsys, "convert", DEFAULT_MODEL, files / "a_folder" / "model.safetensors")
    assert_one_line_error(code, err, "a_folder is not writable")


def test_convert_makes_the_missing_folders_of_a_diffusers_destination(files, capsys):
    code, _, _ = run(capsys, "convert", DEFAULT_MODEL, files / "new" / "deeper" / "model")
    assert code == 0 and (files / "new" / "deeper" / "model" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{}/nope"], "nope: no such file or folder"),
        (["inspect", "{}/a_folder"], "a_folder/model_index.json: missing"),
        (["inspect", "{}/a_file"], "a_file: unknown format"),
        (["info", "{}/nope.png"], "nope.png: no such file"),
        (["info", "{}/a_folder"], "a_folder: is a folder, not an image file"),
        (["info", "{}/init.png"], "init.png: no generation parameters in this image"),
    ],
)
def test_inspect_and_info_refuse_unusable_paths(files, capsys, argv, message):
    code, _, err = run(capsys, *(a.replace("{}", str(files)) for a in argv))
    assert_one_line_error(code, err, message)
