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
from latentforge.images import parse_infotext
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
