"""A generation whose latents or image become NaN/inf is an error that says why, never a black PNG."""

import pytest
import torch

import latentforge
from latentforge import checkpoints
from latentforge.cli import main
from latentforge.errors import GenerationError
from latentforge.pipeline import DEFAULT_MODEL


def poisoned(part: str, key: str):
    pipe = latentforge.load(dtype="float32", device="cpu")
    with torch.no_grad():
        pipe.models()[part].state_dict()[key].view(-1)[0] = float("nan")
    return pipe


@pytest.mark.parametrize(
    "part, key",
    [("unet", "out.2.bias"), ("text_encoder", "final_layer_norm.weight"), ("vae", "decoder.conv_out.bias")],
)
def test_nan_weights_are_an_error_naming_the_part(part, key):
    pipe = poisoned(part, key)
    with pytest.raises(GenerationError, match=rf"became NaN/inf: the model's {part} weights hold NaN/inf \(first in '{key}'\)"):
        pipe.generate("a red circle", seed=1, steps=2)


def test_finite_weights_blame_the_dtype_or_the_settings():
    pipe = latentforge.load(dtype="float32", device="cpu")
    with pytest.raises(GenerationError, match="ran in float32, so the settings"):
        pipe._check_finite(torch.tensor([float("inf")]), "the test tensor")
    pipe.dtype = torch.bfloat16  # the message follows the dtype the model runs in
    with pytest.raises(GenerationError, match="overflowed in bfloat16: run it in float32"):
        pipe._check_finite(torch.tensor([float("nan")]), "the test tensor")
    pipe._check_finite(torch.zeros(3), "a finite tensor")  # no error


def test_cli_with_nan_weights_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    config, parts = checkpoints.read_checkpoint(DEFAULT_MODEL)
    parts["unet"]["out.2.bias"] = torch.full_like(parts["unet"]["out.2.bias"], float("nan"))
    model = tmp_path / "nan.safetensors"
    checkpoints.write_single_file(config, parts, model)
    out = tmp_path / "out"
    status = main(["generate", "a red circle", "--model", str(model), "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("latentforge generate: error: the latents of image 1 became NaN/inf: the model's unet")
    assert list(out.glob("*.png")) == []
