"""The tiny decoder (TAESD): the same images as diffusers' AutoencoderTiny from each file form (diffusers folder,
madebyollin's taesd_decoder file, our own), bad files as one line, the distillation trainer (loss falling,
exact resume, its file read back) and the shipped tiny decoder against the shipped model's full decoder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupted, Interrupting
from safetensors.torch import save_file

from latentforge import cli
from latentforge.pipeline import default_model_path
from latentforge.tiny_decoder import TinyDecoder, TinyDecoderConfig, read_tiny_decoder, write_tiny_decoder
from latentforge.training import loop
from latentforge.training.configs import config_from_dict
from latentforge.training.tiny_decoder import (
    EXPORT,
    load_vae,
    pixel_difference,
    teacher,
    tiny_decoder_task,
    train_tiny_decoder,
)
from latentforge.training.world import ShapesWorld
from latentforge.weightfiles import read_state_dict

SHIPPED = default_model_path().parent / "tiny_decoder" / "latentforge-shapes.safetensors"
# measured 1.89 (mean |tiny - full| per pixel, 0-255, over the 16 shapes-world images of the test, a seed it was
# not trained on); the bound leaves room for another machine's rounding, not for a much worse decoder
SHIPPED_BOUND = 3.0
TINY = {"steps": 6, "batch_size": 2, "image_size": 32, "warmup_steps": 0, "cooldown_steps": 0, "lr": 3e-3,
        "log_every": 1, "sample_every": 0, "heldout_count": 2, "sample_count": 2,
        "model": {"width": 16, "blocks": [1, 1, 1, 1]}}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderTiny in TAESD's shape, random weights."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderTiny(latent_channels=4).eval()


def madebyollin_names(model) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderTiny's decoder as madebyollin's taesd_decoder file has it (index + 1, no encoder)."""
    prefix = "decoder.layers."
    return {
        f"{int(k.removeprefix(prefix).split('.')[0]) + 1}.{k.removeprefix(prefix).split('.', 1)[1]}": v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(prefix)
    }


@pytest.fixture(scope="module")
def taesd_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("taesd") / "taesd_decoder.safetensors"
    save_file(madebyollin_names(reference), str(path))
    return path


def assert_same_images(decoder: TinyDecoder, reference) -> None:
    for shape in ((1, 4, 8, 8), (2, 4, 6, 10)):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1]))
        with torch.no_grad():
            expected = reference.decode(latents).sample
            got = decoder(latents)
        assert got.shape == expected.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
        assert float((got - expected).abs().max()) < 1e-5


# --------------------------------------------------------------------------- the file forms


def test_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "taesd")
    decoder = read_tiny_decoder(tmp_path / "taesd")
    assert decoder.config == TinyDecoderConfig() and decoder.upscale == 8
    assert_same_images(decoder, reference)
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))  # its weights file alone
    assert_same_images(read_tiny_decoder(tmp_path / "weights.safetensors"), reference)


def test_madebyollin_files(reference, taesd_file, tmp_path):
    assert_same_images(read_tiny_decoder(taesd_file), reference)
    torch.save(madebyollin_names(reference), tmp_path / "taesd_decoder.pth")
    assert_same_images(read_tiny_decoder(tmp_path / "taesd_decoder.pth"), reference)


def test_our_file_has_taesd_names(reference, taesd_file, tmp_path):
    write_tiny_decoder(read_tiny_decoder(taesd_file), tmp_path / "ours.safetensors")
    assert_same_images(read_tiny_decoder(tmp_path / "ours.safetensors"), reference)
    tensors = read_state_dict(tmp_path / "ours.safetensors")[0]
    assert tensors.keys() == madebyollin_names(reference).keys()
    write_tiny_decoder(read_tiny_decoder(taesd_file), tmp_path / "half.safetensors", torch.float16)
    half = read_tiny_decoder(tmp_path / "half.safetensors")
    assert half.config == TinyDecoderConfig() and next(half.parameters()).dtype == torch.float32


def test_config_inferred_from_the_tensors(tmp_path):
    config = TinyDecoderConfig(latent_channels=16, width=24, blocks=(2, 0, 1))
    write_tiny_decoder(TinyDecoder(config), tmp_path / "odd.safetensors")
    decoder = read_tiny_decoder(tmp_path / "odd.safetensors", dtype=torch.float64)
    assert decoder.config == config and decoder(torch.zeros(1, 16, 3, 5, dtype=torch.float64)).shape == (1, 3, 12, 20)


# --------------------------------------------------------------------------- bad files


def bad_file(tmp_path, tensors, name="bad.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("3.conv.2.weight"), r"'3\.conv\.2\.weight' is missing"),
        (lambda t: t.update({"12.weight": torch.zeros(64, 64, 1, 1)}), r"'12\.weight' has shape \(64, 64, 1, 1\)"),
        (lambda t: t.update({"7.bias": torch.zeros(64)}), r"'7\.bias' is unexpected"),
        (lambda t: t.update({"1.weight": torch.zeros(64, 4)}), r"'1\.weight' \(a convolution\) is shaped \(64, 4\)"),
        (lambda t: t.update({"19.bias": torch.full((3,), float("nan"))}), "NaN/inf"),
    ],
)  # fmt: skip
def test_damaged_taesd_files_are_one_line(taesd_file, tmp_path, change, message):
    tensors = read_state_dict(taesd_file)[0]
    change(tensors)
    with pytest.raises(ValueError, match=message) as error:
        read_tiny_decoder(bad_file(tmp_path, tensors))
    assert "\n" not in str(error.value) and "bad.safetensors" in str(error.value)


def test_other_files_are_one_line(reference, tmp_path):
    from conftest import tiny_diffusers_vae

    vae_weights = {k: v.contiguous() for k, v in tiny_diffusers_vae().state_dict().items()}
    sd_vae = bad_file(tmp_path, vae_weights, "vae.safetensors")
    encoder = bad_file(tmp_path, {"0.weight": torch.zeros(64, 3, 3, 3)}, "taesd_encoder.safetensors")
    cases = [
        (sd_vae, "full Stable Diffusion VAE"),
        (encoder, "TAESD encoder"),
        (bad_file(tmp_path, {"lora_unet_x.alpha": torch.ones(())}, "lora.safetensors"), "not a TAESD decoder"),
        (tmp_path / "absent.safetensors", "no such file or folder"),
        (tmp_path, "without config.json"),
    ]
    reference.save_pretrained(tmp_path / "relu6")
    config = (tmp_path / "relu6" / "config.json").read_text().replace('"act_fn": "relu"', '"act_fn": "relu6"')
    (tmp_path / "relu6" / "config.json").write_text(config)
    cases.append((tmp_path / "relu6", "act_fn is 'relu6'"))
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            read_tiny_decoder(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value)


# --------------------------------------------------------------------------- the trainer


def tiny(**changes):
    return config_from_dict("tiny-decoder", {**TINY, **changes})


class SameBatch:
    """The same few shapes-world images over and over."""

    def __init__(self, size: int = 32, count: int = 2) -> None:
        self.items = [ShapesWorld(0, size).item(i) for i in range(count)]

    def iterate(self, start: int, step: int):
        index = start
        while True:
            yield self.items[index % len(self.items)]
            index += step


def test_steps_reduce_the_loss_and_the_file_reads_back(tmp_path):
    config = tiny(steps=25)
    result = train_tiny_decoder(config, tmp_path / "run", dataset=SameBatch(), heldout=SameBatch())
    assert sum(result.losses[-3:]) < 0.5 * sum(result.losses[:3]), result.losses
    decoder = read_tiny_decoder(tmp_path / "run" / EXPORT)
    assert decoder.config == TinyDecoderConfig(width=16, blocks=(1, 1, 1, 1))
    latents = torch.randn(1, 4, 4, 4)
    assert torch.equal(decoder(latents), result.shown(latents))


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny(save_every=3)
    whole = train_tiny_decoder(config, tmp_path / "whole", dataset=ShapesWorld(0, 32))
    with pytest.raises(Interrupted):  # killed while reading step 5's batch: step 4 (after the save at 3) is lost
        train_tiny_decoder(config, tmp_path / "cut", dataset=Interrupting(ShapesWorld(0, 32), limit=4 * 2 + 1))
    assert loop.latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    with pytest.raises(ValueError, match="--resume"):
        train_tiny_decoder(config, tmp_path / "cut")
    resumed = train_tiny_decoder(config, tmp_path / "cut", resume=True, dataset=ShapesWorld(0, 32))
    assert resumed.step == 6 and resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    a = read_state_dict(tmp_path / "whole" / EXPORT)[0]
    b = read_state_dict(tmp_path / "cut" / EXPORT)[0]
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_the_command_line(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "steps": 2}))
    args = ["train", "tiny-decoder", "--run", str(tmp_path / "run"), "--config", str(tmp_path / "tiny.json")]
    assert cli.main([*args, "--base", str(default_model_path())]) == 0
    assert read_tiny_decoder(tmp_path / "run" / EXPORT).config.width == 16
    assert cli.main(["train", "tiny-decoder", "--run", str(tmp_path / "other"), "--rank", "4"]) == 2


# --------------------------------------------------------------------------- the shipped tiny decoder


def test_the_shipped_tiny_decoder_decodes_like_the_full_one():
    decoder = read_tiny_decoder(SHIPPED)
    assert decoder.config == TinyDecoderConfig() and SHIPPED.stat().st_size < 2_600_000
    vae = load_vae()
    images = torch.stack([ShapesWorld(1234, 64).item(i)[0] for i in range(16)])  # not the training seed
    with torch.no_grad():
        latents, full = teacher(vae, images)
        difference = pixel_difference(decoder(latents), full)
    assert difference < SHIPPED_BOUND, difference
