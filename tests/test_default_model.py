"""The model's own sampling defaults, `latentforge.load()` without a path, and `latentforge eval`."""

import dataclasses
import json

import diffusers
import pytest

import latentforge
from latentforge import pipeline
from latentforge.checkpoints import read_checkpoint, write_diffusers, write_single_file
from latentforge.cli import main
from latentforge.config import SamplingDefaults
from latentforge.infotext import parse_infotext
from latentforge.pipeline import load_tokenizer

DEFAULTS = SamplingDefaults(sampler="DPM++ 2M", steps=3, cfg_scale=4.5)


@pytest.fixture(scope="module")
def with_defaults(sd1_folder, tmp_path_factory):
    """The tiny SD 1.x model written as a single file and as a diffusers folder, with DEFAULTS."""
    config, parts = read_checkpoint(sd1_folder)
    config = dataclasses.replace(config, defaults=DEFAULTS)
    root = tmp_path_factory.mktemp("defaults")
    write_single_file(config, dict(parts), root / "model.safetensors")
    write_diffusers(config, dict(parts), root / "folder", load_tokenizer(sd1_folder, config))
    return root


@pytest.mark.parametrize("name", ["model.safetensors", "folder"])
def test_defaults_survive_both_layouts(with_defaults, name):
    config, _ = read_checkpoint(with_defaults / name)
    assert config.defaults == DEFAULTS


def test_folder_with_defaults_still_loads_in_diffusers(with_defaults):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(with_defaults / "folder", local_files_only=True)
    assert ref.unet.config.sample_size == 8


def test_checkpoints_without_defaults_get_automatic1111s(sd1_folder):
    assert read_checkpoint(sd1_folder)[0].defaults == SamplingDefaults("Euler a", 20, 7.0)


def test_generate_uses_the_model_defaults_unless_given(with_defaults):
    pipe = latentforge.load(with_defaults / "model.safetensors", dtype="float32")
    params = parse_infotext(pipe.generate("a red circle", seed=3)[0].info["parameters"])
    assert (params["Sampler"], params["Steps"], params["CFG scale"]) == ("DPM++ 2M", "3", "4.5")
    params = parse_infotext(pipe.generate("a red circle", seed=3, steps=2, cfg_scale=2, sampler="Euler")[0].info["parameters"])
    assert (params["Sampler"], params["Steps"], params["CFG scale"]) == ("Euler", "2", "2")


def test_bad_defaults_in_a_folder_are_named(with_defaults, tmp_path):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(with_defaults / "folder", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_latentforge_defaults"] = {"sampler": "DPM++ 2M", "steps": 0}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="default steps must be a whole number >= 1, got 0"):
        read_checkpoint(folder)


def test_load_without_a_path_names_a_missing_default_model(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", tmp_path / "gone.safetensors")
    with pytest.raises(ValueError, match="default model .*gone.safetensors is missing from this installation"):
        latentforge.load()


def test_eval_command_prints_a_table_and_writes_json(with_defaults, tmp_path, capsys):
    out = tmp_path / "eval.json"
    model = str(with_defaults / "model.safetensors")
    code = main(["eval", "--model", model, "-n", "3", "--steps", "2", "--cfg-scale", "1", "--cfg-scale", "default",
                 "--json", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    assert "defaults: DPM++ 2M, 3 steps, guidance 4.5" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 4.5 (default)")]
    assert len(rows) == 2
    result = json.loads(out.read_text())
    assert [s["cfg_scale"] for s in result["scales"]] == [1.0, 4.5]
    assert all(len(s["records"]) == 3 for s in result["scales"])
    assert "skipping work: none" in stdout and result["speed"] == {}


def test_eval_names_the_speed_options_it_ran_with(with_defaults, tmp_path, capsys):
    out = tmp_path / "eval.json"
    model = str(with_defaults / "model.safetensors")
    argv = ["eval", "--model", model, "-n", "2", "--steps", "2", "--speed", "fast", "--s-min-uncond", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    from latentforge.speed import preset

    fast = preset("fast")
    assert fast.s_min_uncond and fast.skip_early_cfg and fast.token_merging  # what the preset holds
    expected = {"Skip Early CFG": fast.skip_early_cfg, "Token merging ratio": fast.token_merging}  # NGMS switched off
    assert "skipping work: " + ", ".join(f"{k}: {v}" for k, v in expected.items()) in stdout
    assert json.loads(out.read_text())["speed"] == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cfg-scale", "lots"], "--cfg-scale must be a number or 'default', got 'lots'"),
        (["-n", "0"], "n must be a whole number >= 1, got 0"),
        (["--two-objects", "1.5"], "two-object fraction must be between 0 and 1, got 1.5"),
        (["--json", "/nonexistent/x.json"], "folder /nonexistent does not exist"),
    ],
)
def test_eval_command_rejects_bad_options(with_defaults, capsys, argv, message):
    code = main(["eval", "--model", str(with_defaults / "model.safetensors"), "--steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- the model that ships

SHIPPED_PROMPT = "a small red circle on the left, white background"


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load(dtype="float32", device="cpu")


def test_shipped_model_is_in_the_package_and_small():
    assert pipeline.DEFAULT_MODEL.is_file()
    assert pipeline.DEFAULT_MODEL.stat().st_size < 50e6


def test_shipped_model_loads_and_makes_an_image(shipped):
    assert shipped.name == "latentforge-shapes" and shipped.config.native_size == 64
    image = shipped.generate(SHIPPED_PROMPT, seed=0)[0]
    assert image.size == (64, 64)
    params = parse_infotext(image.info["parameters"])
    defaults = shipped.config.defaults
    assert (params["Steps"], params["Model"]) == (str(defaults.steps), "latentforge-shapes")


def test_shipped_model_follows_its_prompts(shipped):
    """Judged like `latentforge eval`, on prompts and seeds the default settings were not chosen on
    (those used seed 1): the whole-prompt accuracy measured in docs/default-model.md is far above this."""
    from latentforge.training.evaluate import evaluate

    result = evaluate(shipped, n=12, seed=2, cfg_scales=(None,), two_objects_fraction=0.0)
    assert result["scales"][0]["single_object"] >= 0.5


def test_generate_command_uses_the_shipped_model(tmp_path, capsys):
    assert main(["generate", SHIPPED_PROMPT, "--seed", "5", "--out", str(tmp_path)]) == 0
    path = capsys.readouterr().out.split()[0]
    from PIL import Image

    assert Image.open(path).size == (64, 64)


def test_shipped_model_gives_the_same_image_in_diffusers(shipped, tmp_path, capsys):
    import torch
    from test_generate import assert_same_image

    folder = tmp_path / "shapes-diffusers"
    assert main(["convert", str(pipeline.DEFAULT_MODEL), str(folder)]) == 0
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    defaults = shipped.config.defaults
    from latentforge.samplers import DIFFUSERS_SCHEDULERS

    assert type(ref.scheduler).__name__ == DIFFUSERS_SCHEDULERS[defaults.sampler][0]  # the default sampler's
    for prompt, seed in ((SHIPPED_PROMPT, 11), ("a red circle to the left of a blue square, black background", 12)):
        ours = shipped.generate(prompt, seed=seed)[0]
        theirs = ref(prompt, num_inference_steps=defaults.steps, guidance_scale=defaults.cfg_scale,
                     generator=torch.Generator().manual_seed(seed), height=64, width=64).images[0]  # fmt: skip
        assert_same_image(ours, theirs)
