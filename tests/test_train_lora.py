"""LoRA training (`latentforge train lora`): the star in the shapes world and its judge, the kohya file, the
loss falling, exact resume, two processes equal to one, the file read by latentforge's loader and by
diffusers' load_lora_weights with the same image, and bad inputs as one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Interrupted, Interrupting, saved_folder
from safetensors import safe_open

import latentforge
from latentforge import cli
from latentforge.training import loop
from latentforge.training.configs import LoraTrainConfig, config_from_dict
from latentforge.training.judge import judge_image, score
from latentforge.training.lora import (
    LoRANetwork,
    kind_prompts,
    load_base,
    lora_targets,
    lora_task,
    merged_pipeline,
    train_lora,
)
from latentforge.training.world import (
    ALL_KINDS,
    BACKGROUNDS,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    Shape,
    ShapesWorld,
    draw,
    grammar_prompts,
    sample_scene,
)

# what `ShapesWorld(3, 64, 0.5)` (plain and twinned), `grammar_prompts` and `draw` gave before the star existed
# (computed with the world.py of the commit before it): the default world must not change
DEFAULT_WORLD_SHA256 = "f03b09292871ee1c1b166946d6a232289daf52b581e955da89a1c09853f4b2a5"
TINY = {"batch_size": 4, "warmup_steps": 0, "log_every": 1, "sample_every": 0, "rank": 4, "alpha": 2.0, "lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny(**changes) -> LoraTrainConfig:
    return config_from_dict("lora", {**TINY, **changes})


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


# --------------------------------------------------------------------------- the world and the judge


def test_default_world_is_unchanged():
    h = hashlib.sha256()
    for twins in (False, True):
        world = ShapesWorld(3, 64, 0.5, twins=twins)
        for i in range(400):
            h.update(repr(world.example_at(i)).encode())
    rng = random.Random(7)
    for _ in range(200):
        h.update(repr(grammar_prompts(rng)).encode())
    h.update(draw(world.scene_at(5)).tobytes())
    assert h.hexdigest() == DEFAULT_WORLD_SHA256
    assert all(o.kind != "star" for i in range(500) for o in ShapesWorld(0).scene_at(i).objects)


def test_extra_kinds_mix_stars_into_ordinary_scenes():
    world = ShapesWorld(0, 64, kinds=ALL_KINDS)
    kinds = [o.kind for i in range(800) for o in world.scene_at(i).objects]
    assert set(kinds) == set(ALL_KINDS)
    assert 0.2 < kinds.count("star") / len(kinds) < 0.3
    captions = [world.example_at(i)[1] for i in range(200)]
    assert any(" star" in c for c in captions) and any(" circle" in c for c in captions)
    assert ShapesWorld(0, 64, kinds=("star",)).scene_at(0).objects[0].kind == "star"
    for bad in ((), ("star", "star"), ("hexagon",), "star"):
        with pytest.raises(ValueError, match="kind"):
            ShapesWorld(0, kinds=bad)


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("size", SIZES)
def test_judge_reads_stars(size, background):
    for position in POSITIONS:
        scene = Scene(background, (Shape("star", "orange", size, POSITIONS[position], SIZES[size]),), position=position)
        reading = judge_image(draw(scene))
        assert reading.objects[0].kind == "star" and score(reading, scene)["all"], (position, reading)
    pair = Scene(background, tuple(
        Shape(k, c, "small", p, SIZES["small"])
        for k, c, p in (("star", "red", (0.25, 0.5)), ("circle", "blue", (0.75, 0.5)))
    ), relation="to the left of")  # fmt: skip
    assert score(judge_image(draw(pair)), pair)["all"]


def test_judge_verdicts_on_the_old_kinds_are_unchanged():
    """With the star among the candidates, the judge reads the old kinds' images exactly as with the three kinds
    alone, clean and degraded (noise 10/255, blur 0.6 px): only the star's IoU is added to each object."""
    from test_judge import degrade

    rng, noise = random.Random(20), np.random.default_rng(3)
    for _ in range(150):
        image = draw(sample_scene(rng))
        for shown in (image, degrade(image, noise)):
            now, before = judge_image(shown), judge_image(shown, KINDS)
            assert len(now.objects) == len(before.objects) and now.background == before.background
            for a, b in zip(now.objects, before.objects):
                assert dataclasses.replace(a, shape_iou=b.shape_iou) == b
                assert a.shape_iou[:3] == b.shape_iou and a.shape_iou[3][0] == "star"


# --------------------------------------------------------------------------- the network and the file


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory) -> Path:
    """`latentforge train lora` on the shipped model, 6 steps (through the command line)."""
    root = tmp_path_factory.mktemp("lora")
    (root / "tiny.json").write_text(json.dumps({**TINY, "output_name": "tiny"}))
    args = ["train", "lora", "--run", str(root / "run"), "--config", str(root / "tiny.json"), "--steps", "6"]
    assert cli.main([*args, "--rank", "4"]) == 0
    return root / "run"


def test_the_file_is_a_kohya_lora(shipped_run):
    tensors, metadata = read_file(shipped_run / "tiny.safetensors")
    base = load_base()
    unet_layers = sum(1 for n, _ in base.unet.named_modules() if n.endswith((".proj_in", ".to_q", ".ff.net.2")))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    text = {m for m in modules if m.startswith("lora_te_text_model_encoder_layers_")}
    assert unet | text == modules
    # per transformer: proj_in, proj_out, 2 x (to_q, to_k, to_v, to_out.0), ff.net.0.proj, ff.net.2
    assert len(unet) == 12 * sum(1 for n, _ in base.unet.named_modules() if n.endswith(".proj_in"))
    assert len(text) == 6 * base.config.text_encoder.layers and unet_layers > 0
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in unet
    assert "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in unet
    assert "lora_te_text_model_encoder_layers_3_self_attn_q_proj" in text
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2" in text
    assert len(tensors) == 3 * len(modules)
    conv = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert conv.shape == (4, 64, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (64, 4, 1, 1)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 192) and tensors[f"{q}.lora_up.weight"].shape == (192, 4)
    assert tensors[f"{q}.alpha"].shape == () and float(tensors[f"{q}.alpha"]) == 2.0
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert any(float(tensors[f"{m}.lora_up.weight"].abs().max()) > 0 for m in modules)  # trained off zero
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2")
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_output_name"] == "tiny" and metadata["ss_steps"] == "6"
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_learning_rate"] == "0.01"
    assert metadata["ss_sd_model_name"] == "latentforge-shapes.safetensors"
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert 1.7e9 < started <= finished
    assert "ss_network_args" not in metadata  # plain LoRA: no network options
    config = json.loads((shipped_run / "config.json").read_text())
    assert config["rank"] == 4 and config["kinds"] == list(ALL_KINDS) and config["base"] == ""


def test_unet_only_targets_no_text_encoder(tmp_path):
    result = train_lora(tiny(steps=1, train_text_encoder=False, output_name="u"), tmp_path / "run")
    tensors, metadata = read_file(tmp_path / "run" / "u.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert metadata["ss_network_train_unet_only"] == "True" and result.step == 1


def test_loaders_give_the_training_time_model(shipped_run):
    """latentforge's loader (Pipeline.generate(loras=)) and merged weights draw the same image; the training-time
    hooks compute the same UNet output as the merged weights."""
    path = shipped_run / "tiny.safetensors"
    prompt = "a large red star in the center, white background"
    pipe = latentforge.load(dtype="float32", device="cpu")
    base_image = np.asarray(pipe.generate(prompt, seed=3)[0], dtype=np.int16)
    loaded = np.asarray(pipe.generate(prompt, seed=3, loras={path: 1.0})[0], dtype=np.int16)
    base = load_base()
    targets = lora_targets(base.unet, base.text_encoder)
    network = LoRANetwork(targets, 4, 2.0)
    network.load_state_dict(read_file(path)[0], strict=True)
    merged_pipe = merged_pipeline(pipe.source, network, torch.device("cpu"), torch.float32)
    merged = np.asarray(merged_pipe.generate(prompt, seed=3)[0], dtype=np.int16)
    assert np.abs(loaded - merged).max() <= 2
    assert np.abs(loaded - base_image).max() > 10  # the LoRA changed the image

    live = LoRANetwork(targets, 4, 2.0)
    live.load_state_dict(network.state_dict())
    live.attach({name: module for name, (_, _, module) in targets.items()})
    g = torch.Generator().manual_seed(0)
    x, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), base.tokenizer(["a red star", ""])
    with torch.no_grad():
        hooked = base.unet(x, t, base.text_encoder(ids))
        plain = merged_pipe.unet(x, t, merged_pipe.conditioner.text_encoder(ids))
    assert torch.allclose(hooked, plain, atol=1e-4), float((hooked - plain).abs().max())


# --------------------------------------------------------------------------- training


def fixed_loss(task, base, seed: int = 5) -> float:
    """The objective on one fixed batch and fixed draws."""
    world = ShapesWorld(9, 64, kinds=ALL_KINDS)
    images = torch.stack([world.item(i)[0] for i in range(8)])
    captions = [world.item(i)[1] for i in range(8)]
    draws = loop.StepRandom(seed, 0, 8, loop.SINGLE_PROCESS)
    with torch.no_grad():
        return float(task.objective(**task.inputs(images, captions, draws))[0])


class SameBatch:
    """A dataset whose training stream repeats the first 8 items of a star world."""

    def __init__(self) -> None:
        self.world = ShapesWorld(9, 64, kinds=ALL_KINDS)

    def iterate(self, start: int, step: int):
        index = start
        while True:
            yield self.world.item(index % 8)
            index += step


def test_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    config = tiny(steps=12, batch_size=8, lr=3e-3, uncond_prob=0.0)
    base = load_base()
    task = lora_task(config, base)
    before = fixed_loss(task, base)
    result = loop.train(task, config, tmp_path / "run", SameBatch())
    after = fixed_loss(task, base)
    assert after < 0.9 * before, (before, after)
    assert result.step == 12 and (tmp_path / "run" / "star.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny(steps=6, save_every=3)
    whole = train_lora(config, tmp_path / "whole", dataset=ShapesWorld(0, 64, kinds=ALL_KINDS))
    with pytest.raises(Interrupted):  # killed while reading step 5's batch: step 4 (after the save at 3) is lost
        train_lora(config, tmp_path / "cut", dataset=Interrupting(ShapesWorld(0, 64, kinds=ALL_KINDS), limit=4 * 4 + 1))
    assert loop.latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    with pytest.raises(ValueError, match="--resume"):
        train_lora(config, tmp_path / "cut")
    resumed = train_lora(config, tmp_path / "cut", resume=True, dataset=ShapesWorld(0, 64, kinds=ALL_KINDS))
    assert resumed.step == 6 and resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    a, b = read_file(tmp_path / "whole" / "star.safetensors")[0], read_file(tmp_path / "cut" / "star.safetensors")[0]
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    started = json.loads((tmp_path / "cut" / "config.json").read_text())["started_at"]
    assert read_file(tmp_path / "cut" / "star.safetensors")[1]["ss_training_started_at"] == f"{started:.3f}"


def _ddp_worker(rank: int, world: int, store: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = loop.setup_distributed("cpu", init_method=f"file://{store}")
    try:
        torch.save(_train_float64(Path(root), dist), Path(root) / f"rank{rank}.pt")
    finally:
        loop.teardown_distributed()


def _train_float64(root: Path, dist: loop.Dist) -> dict[str, torch.Tensor]:
    """3 steps in float64 (see test_training.test_two_processes_equal_one); the final LoRA weights."""
    torch.set_default_dtype(torch.float64)
    try:
        data = Float64World()
        result = train_lora(tiny(steps=3), root / "run", dist, dataset=data, dtype=torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


class Float64World:
    def __init__(self) -> None:
        self.world = ShapesWorld(0, 64, kinds=ALL_KINDS)

    def iterate(self, start: int, step: int):
        for image, caption in self.world.iterate(start, step):
            yield image.double(), caption


def test_two_processes_equal_one(tmp_path):
    args = (2, str(tmp_path / "store"), str(tmp_path / "ddp"))
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _train_float64(tmp_path / "one", loop.Dist())
    ups = [k for k in single if k.endswith("lora_up.weight")]
    assert max(float(single[k].abs().max()) for k in ups) > 1e-4  # the weights moved off zero
    for k in single:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert float((ranks[0][k] - single[k]).abs().max()) < 1e-9, k


# --------------------------------------------------------------------------- other programs read the file


def test_diffusers_loads_the_file_with_the_same_image(tmp_path_factory, tmp_path):
    """A LoRA trained on a tiny random SD 1.x diffusers model: diffusers' load_lora_weights and latentforge's
    loader draw the same image (within 2/255), and not the base model's."""
    import diffusers

    folder = saved_folder("sd1", tmp_path_factory)
    train_lora(tiny(steps=4, base=str(folder), lr=5e-2, output_name="sd1"), tmp_path / "run")
    path = tmp_path / "run" / "sd1.safetensors"
    assert read_file(path)[1]["ss_sd_model_name"] == folder.name
    prompt, steps, seed = "a small red star on the left, white background", 4, 1234
    ours = latentforge.load(folder, dtype="float32", device="cpu")
    plain = np.asarray(ours.generate(prompt, "blurry", steps=steps, sampler="Euler", seed=seed)[0], dtype=np.int16)
    mine = ours.generate(prompt, "blurry", steps=steps, sampler="Euler", seed=seed, loras={path: 1.0})[0]
    mine = np.asarray(mine, dtype=np.int16)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    theirs = ref(prompt, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.0,
                 generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
    assert np.abs(mine - np.asarray(theirs, dtype=np.int16)).max() <= 2
    assert np.abs(mine - plain).max() > 10


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    for args, words in (
        (["--rank", "0"], "rank must be a whole number >= 1"),
        (["--base", str(tmp_path / "missing.safetensors")], "no such file or folder"),
        (["--base", str(not_a_model(tmp_path))], "unknown format"),
    ):
        assert cli.main(["train", "lora", "--run", run, "--steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert cli.main(["train", "vae", "--run", run, "--rank", "4"]) == 2
    assert "--rank is for `train lora`" in capsys.readouterr().err
    assert cli.main(["train", "vae", "--run", run, "--base", "model.safetensors"]) == 2
    assert "--base is for `train lora` and `train tiny-decoder`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="alpha"):
        tiny(alpha=0)
    prompts = kind_prompts("star", 3, 0, "large")
    assert all(p.startswith("a large ") and s.objects[0].kind == "star" for p, s, _ in prompts)


def not_a_model(tmp_path: Path) -> Path:
    """A file that is no model."""
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"not a checkpoint")
    return path


def test_the_shipped_star_lora():
    """src/latentforge/data/lora/star.safetensors: a rank-8 kohya LoRA of the shipped model that changes its image."""
    path = Path(latentforge.__file__).parent / "data" / "lora" / "star.safetensors"
    tensors, metadata = read_file(path)
    assert metadata["ss_output_name"] == "star" and metadata["ss_network_dim"] == "8"
    assert metadata["ss_sd_model_name"] == "latentforge-shapes.safetensors" and metadata["ss_steps"] == "1200"
    assert all(v.shape[0] == 8 for k, v in tensors.items() if k.endswith("lora_down.weight"))
    pipe = latentforge.load(dtype="float32", device="cpu")
    prompt = "a large red star in the center, white background"
    plain = np.asarray(pipe.generate(prompt, seed=1)[0], dtype=np.int16)
    starred = np.asarray(pipe.generate(prompt, seed=1, loras={path: 1.0})[0], dtype=np.int16)
    assert np.abs(plain - starred).max() > 10
