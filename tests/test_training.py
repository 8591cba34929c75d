"""The trainers on tiny configs: losses fall, resuming is exact, two processes equal one, saves are
atomic, and a trained run exports to a model that latentforge.load generates with.

One `latentforge train all` run (through the command line, tiny config, 16 x 16 shapes) is shared by
the tests; the others start from its VAE and text encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import Interrupted, Interrupting

from latentforge import cli
from latentforge.training import loop
from latentforge.training.clip import clip_task, train_clip
from latentforge.training.configs import UNetTrainConfig, config_from_dict, config_to_dict
from latentforge.training.data import open_datasets
from latentforge.training.unet import assemble, fit_to_parts, train_unet, unet_task
from latentforge.training.vae import train_vae
from latentforge.training.world import ShapesWorld
from latentforge.vae import sample_latents

SIZE = 16
COMMON = {"batch_size": 8, "image_size": SIZE, "warmup_steps": 0, "log_every": 1, "max_grad_norm": 1.0}
TINY = {
    "vae": {
        "model": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 4},
        "batch_size": 16, "lr": 3e-3, "recon_loss": "mse", "scale_batches": 2, "sample_count": 4,
    },
    "clip": {
        "text": {"width": 32, "layers": 2, "heads": 2, "mlp_width": 64},
        "image": {"channels": [8, 16, 32], "norm_groups": 4, "pooled_size": 2},
        "embed_dim": 32, "lr": 2e-3, "weight_decay": 0.0, "eval_count": 16, "sample_count": 2,
    },
    "unet": {
        "model": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "num_heads": 2, "norm_groups": 8},
        "lr": 2e-3, "ema_decay": 0.9, "sample_count": 1, "sample_seeds": 1, "sample_steps": 2,
    },
}  # fmt: skip
STEPS = 40  # steps of the shared run


def tiny(kind: str, **changes):
    """The tiny config of a trainer, with changes."""
    return config_from_dict(kind, {**COMMON, **TINY[kind], **changes})


def log_losses(run: Path) -> list[float]:
    """The per-step losses a run logged, in step order."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A `latentforge train all` run of the tiny configs (through the command line)."""
    root = tmp_path_factory.mktemp("train-all")
    config = root / "tiny.json"
    sections = {kind: {**COMMON, **TINY[kind], "save_every": STEPS // 2, "sample_every": STEPS // 2} for kind in TINY}
    config.write_text(json.dumps(sections))
    assert cli.main(["train", "all", "--run", str(root / "run"), "--config", str(config), "--steps", str(STEPS)]) == 0
    return root / "run"


@pytest.mark.parametrize("kind", ["vae", "clip", "unet"])
def test_loss_falls(trained, kind):
    """Each trainer's mean loss over its last 5 steps is well below that of its first 5."""
    losses = log_losses(trained / kind)
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (kind, losses)
    assert (trained / kind / "samples" / f"step-{STEPS:08d}.png").is_file()
    assert (trained / kind / "samples" / f"step-{STEPS // 2:08d}.png").is_file()


def test_run_outputs(trained):
    """The exports exist; the VAE's scale is 1 / std of its latents; CLIP reports retrieval accuracy."""
    vae = loop.load_part(trained / "vae", "vae")
    images = torch.stack([ShapesWorld(7, SIZE).item(i)[0] for i in range(64)])
    with torch.no_grad():
        latents = sample_latents(*vae.encode(images), torch.Generator().manual_seed(0))
    assert vae.config.scaling_factor != 0.18215
    assert 0.8 < float((latents * vae.config.scaling_factor).std()) < 1.2
    final = [json.loads(line) for line in (trained / "clip" / "log.jsonl").read_text().splitlines()][-1]
    assert final["final"] and 0.0 <= final["retrieval_top1"] <= 1.0
    unet_config = json.loads((trained / "unet" / "config.json").read_text())
    assert unet_config["model"]["context_dim"] == 32 and unet_config["vae"] == "../vae"


def test_learning_rate_schedule():
    """Linear warm-up to lr, constant, then a linear cooldown that reaches 0 after the last step."""
    config = UNetTrainConfig(steps=100, lr=1.0, warmup_steps=10, cooldown_steps=20)
    rates = [loop.learning_rate(config, step) for step in range(config.steps)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0
    assert rates[10:80] == [1.0] * 70
    assert rates[80] == 1.0 and rates[90] == pytest.approx(0.5) and rates[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[80:], rates[81:], strict=False))
    assert loop.learning_rate(UNetTrainConfig(steps=100, lr=1.0, warmup_steps=0), 99) == 1.0
    with pytest.raises(ValueError, match="cooldown_steps"):
        UNetTrainConfig(cooldown_steps=-1)


def test_config_json():
    """A JSON config changes only what it names (nested model configs too), round-trips, and unknown keys fail."""
    config = config_from_dict("unet", {"steps": 5, "model": {"model_channels": 32, "attention_levels": [2]}})
    default = UNetTrainConfig()
    assert (config.steps, config.model.model_channels, config.model.attention_levels) == (5, 32, (2,))
    assert config.model.channel_mult == default.model.channel_mult and config.lr == default.lr
    assert config_from_dict("unet", json.loads(json.dumps(config_to_dict(config)))) == config
    with pytest.raises(ValueError, match="unknown key.*stepz"):
        config_from_dict("vae", {"stepz": 5})
    with pytest.raises(ValueError, match=r"unet\.model: unknown key.*channels"):
        config_from_dict("unet", {"model": {"channels": 5}})
    with pytest.raises(ValueError, match="ema_decay"):
        config_from_dict("unet", {"ema_decay": 1.0})


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's weights."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_equals_uninterrupted(trained, tmp_path):
    """A UNet run killed mid-way and resumed ends with the weights (and EMA) of an uninterrupted run."""
    parts = {"vae": str(trained / "vae"), "text_encoder": str(trained / "clip")}
    config = tiny("unet", steps=8, save_every=3, sample_every=0, **parts)
    whole = train_unet(config, tmp_path / "whole", dataset=ShapesWorld(0, SIZE))
    # killed while reading step 6's batch: steps 4 and 5 (after the save at 3) are lost
    with pytest.raises(Interrupted):
        train_unet(config, tmp_path / "cut", dataset=Interrupting(ShapesWorld(0, SIZE), limit=5 * 8 + 3))
    assert loop.latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    with pytest.raises(ValueError, match="--resume"):
        train_unet(config, tmp_path / "cut", dataset=ShapesWorld(0, SIZE))
    with pytest.raises(ValueError, match="seed 0"):
        train_unet(dataclasses.replace(config, seed=1), tmp_path / "cut", resume=True, dataset=ShapesWorld(0, SIZE))
    resumed = train_unet(config, tmp_path / "cut", resume=True, dataset=ShapesWorld(0, SIZE))
    assert resumed.step == 8 and len(resumed.losses) == 5
    assert resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    assert max_difference(state_of(resumed.model), state_of(whole.model)) < 1e-6
    assert max_difference(state_of(resumed.shown), state_of(whole.shown)) < 1e-6


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save that fails half-way (here: after the weights and optimizer, at state.json) leaves the
    previous checkpoint named and loadable, no stray files, and --resume finishes the run exactly."""
    config = tiny("vae", steps=4, save_every=2, sample_every=0)
    whole = train_vae(config, tmp_path / "whole")
    real_write_json = loop.write_json
    saves = []

    def failing_write_json(obj, path):
        if Path(path).name == "state.json":
            saves.append(path)
            if len(saves) == 2:
                Path(path).write_text('{"step": 4, "samples')  # half a file, then the failure
                raise OSError("No space left on device")
        real_write_json(obj, path)

    monkeypatch.setattr(loop, "write_json", failing_write_json)
    with pytest.raises(OSError, match="No space"):
        train_vae(config, tmp_path / "cut")
    monkeypatch.setattr(loop, "write_json", real_write_json)
    folder = loop.latest_checkpoint(tmp_path / "cut")
    assert folder.name == "step-00000002"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["latest.json", "step-00000002"]
    state = json.loads((folder / "state.json").read_text())
    assert state == {"step": 2, "samples_seen": 2 * config.batch_size, "seed": 0}
    resumed = train_vae(config, tmp_path / "cut", resume=True)
    assert max_difference(state_of(resumed.model), state_of(whole.model)) < 1e-6


def test_stale_temporary_checkpoint_is_ignored_and_removed(tmp_path):
    """A checkpoint folder left half-written by a killed process is never read, and the next save removes it."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    loop.save_checkpoint(tmp_path, loop.TrainState(1, 8, 0), model, None, optimizer, keep=1)
    stale = tmp_path / loop.CHECKPOINTS / ".step-00000002.tmp-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    assert loop.latest_checkpoint(tmp_path).name == "step-00000001"
    loop.save_checkpoint(tmp_path, loop.TrainState(2, 16, 0), model, None, optimizer, keep=1)
    assert sorted(p.name for p in (tmp_path / loop.CHECKPOINTS).iterdir()) == ["latest.json", "step-00000002"]


class Float64World:
    """ShapesWorld with float64 images, for runs in float64."""

    def __init__(self, seed: int) -> None:
        self.world = ShapesWorld(seed, SIZE)

    def iterate(self, start: int, step: int):
        for image, caption in self.world.iterate(start, step):
            yield image.double(), caption


def _train_clip_and_unet(root: Path, parts: dict[str, str], dist: loop.Dist) -> dict[str, dict[str, torch.Tensor]]:
    """3 steps of CLIP and of the UNet in float64; the final weights of each."""
    torch.set_default_dtype(torch.float64)
    try:
        data = {"dataset": Float64World(0), "heldout": Float64World(1)}
        clip = train_clip(tiny("clip", steps=3, sample_every=0), root / "clip", dist, **data)
        unet = train_unet(tiny("unet", steps=3, sample_every=0, **parts), root / "unet", dist, **data)
    finally:
        torch.set_default_dtype(torch.float32)
    return {"clip": state_of(clip.model), "unet": state_of(unet.model)}


def _ddp_worker(rank: int, world: int, store: str, root: str, parts: dict[str, str]) -> None:
    """One rank of the two-process run; saves this rank's final weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = loop.setup_distributed("cpu", init_method=f"file://{store}")
    try:
        torch.save(_train_clip_and_unet(Path(root), parts, dist), Path(root) / f"rank{rank}.pt")
    finally:
        loop.teardown_distributed()


def test_two_processes_equal_one(trained, tmp_path):
    """Two gloo ranks, each on half of every global batch, end with identical weights, equal to one process.

    In float64: in float32, Adam turns the rounding noise of gradients that are nearly zero (sums
    that cancel, and exactly zero in theory for the text tower's key biases) into steps of up to lr,
    which hides a real difference among harmless ones."""
    parts = {"vae": str(trained / "vae"), "text_encoder": str(trained / "clip")}
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp"), parts), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _train_clip_and_unet(tmp_path / "one", parts, loop.Dist())
    initial = state_of(clip_task(tiny("clip"), ShapesWorld(1, SIZE)).model)
    assert max_difference(initial, {k: v.float() for k, v in single["clip"].items()}) > 1e-4  # the weights moved
    for kind in ("clip", "unet"):
        assert max_difference(ranks[0][kind], ranks[1][kind]) == 0.0
        assert max_difference(ranks[0][kind], single[kind]) < 1e-5
    assert json.loads((tmp_path / "ddp" / "clip" / "checkpoints" / "latest.json").read_text())["step"] == 3


def test_export_loads_and_generates(trained, tmp_path):
    """`train export` writes a single file that latentforge.load reads and generates an image with."""
    import latentforge

    out = tmp_path / "model.safetensors"
    assert cli.main(["train", "export", "--run", str(trained), "--out", str(out), "--dtype", "float16"]) == 0
    pipe = latentforge.load(out, dtype="float32", device="cpu")
    assert pipe.config.native_size == SIZE
    assert pipe.config.vae.scaling_factor == loop.load_part(trained / "vae", "vae").config.scaling_factor
    image = pipe.generate("a red circle", steps=3, seed=1, sampler="Euler")[0]
    assert image.size == (SIZE, SIZE)
    assert len(image.getcolors(SIZE * SIZE)) > 1  # not a blank image
    config, parts, tokenizer = assemble(trained / "unet")  # the UNet run folder works too
    assert config.unet.context_dim == config.text_encoder.width and tokenizer.max_length == 77
    ema = loop.read_part(trained / "unet", "unet")[1]
    assert all(torch.equal(parts["unet"][k], ema[k]) for k in ema)
    assert cli.main(["train", "export", "--run", str(trained), "--out", str(out)]) == 2  # never overwrites


def test_decoder_fine_tuning_keeps_the_encoder(trained, tmp_path):
    """train_encoder false: only the decoder learns, the scale is kept, and export accepts it as --vae."""
    run = tmp_path / "decoder"
    train_vae(tiny("vae", init=str(trained / "vae"), train_encoder=False, steps=4), run)
    before = loop.read_part(trained / "vae", "vae")
    after = loop.read_part(run, "vae")
    assert after[0].scaling_factor == before[0].scaling_factor
    encoder = [k for k in before[1] if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(before[1][k], after[1][k]) for k in encoder)
    decoder = [k for k in before[1] if k.startswith("decoder.")]
    assert any(not torch.equal(before[1][k], after[1][k]) for k in decoder)
    assert json.loads((run / "config.json").read_text())["init"] == os.path.relpath(trained / "vae", run)

    out = tmp_path / "model.safetensors"
    argv = ["train", "export", "--run", str(trained), "--vae", str(run), "--out", str(out),
            "--default-sampler", "DPM++ 2M", "--default-steps", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    config, parts, _ = assemble(trained, vae=run)
    assert all(torch.equal(parts["vae"][k], after[1][k]) for k in after[1])
    import latentforge

    pipe = latentforge.load(out, dtype="float32", device="cpu")
    assert (pipe.config.defaults.sampler, pipe.config.defaults.steps) == ("DPM++ 2M", 5)
    assert pipe.config.defaults.cfg_scale == tiny("unet").sample_cfg_scale  # the rest: the run's sample settings


def test_export_refuses_a_vae_with_another_encoder(trained, tmp_path, capsys):
    other = tmp_path / "other"
    train_vae(tiny("vae", steps=2, seed=5), other)
    argv = ["train", "export", "--run", str(trained), "--vae", str(other), "--out", str(tmp_path / "m.safetensors")]
    assert cli.main(argv) == 2
    assert "its encoder differs from the one the UNet was trained on" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs init"):
        tiny("vae", train_encoder=False)


def test_clip_starts_from_a_run_and_trains_on_twins(trained, tmp_path):
    """init: both towers start as another run's checkpoint left them; hard_negatives: the batches are
    scene / twin pairs, and the report measures retrieval among such pairs too."""
    source = loop.checkpoint_weights(trained / "clip")
    config = tiny("clip", init=str(trained / "clip"), hard_negatives=True, steps=2, sample_every=0)
    started = state_of(clip_task(config, ShapesWorld(1, SIZE), source).model)
    assert max_difference(started, source) == 0.0
    run = tmp_path / "clip"
    train_clip(config, run)
    final = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= final["twin_retrieval_top1"] <= 1.0
    assert json.loads((run / "config.json").read_text())["init"] == os.path.relpath(trained / "clip", run)
    with pytest.raises(ValueError, match="not a run folder with a checkpoint"):
        train_clip(tiny("clip", init=str(tmp_path / "missing")), tmp_path / "other")
    with pytest.raises(ValueError, match="needs the shapes world"):
        tiny("clip", hard_negatives=True, data=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size must be even"):
        tiny("clip", hard_negatives=True, batch_size=7)
    with pytest.raises(ValueError, match="needs the shapes world as training data"):
        train_clip(config, tmp_path / "folder", dataset=[(torch.zeros(3, SIZE, SIZE), "a caption")] * 8)


def test_unet_starts_from_a_run(trained, tmp_path):
    """init: the UNet starts as another run's exported (EMA) UNet; a UNet of another shape is refused."""
    parts = {"vae": str(trained / "vae"), "text_encoder": str(trained / "clip")}
    config = tiny("unet", init=str(trained / "unet"), steps=1, sample_every=0, **parts)
    vae, text_encoder = loop.load_part(parts["vae"], "vae"), loop.load_part(parts["text_encoder"], "text_encoder")
    init = loop.read_part(trained / "unet", "unet")
    config = fit_to_parts(config, vae, text_encoder)
    task = unet_task(config, vae, text_encoder, ShapesWorld(1, SIZE), init)
    assert max_difference(state_of(task.model), init[1]) == 0.0
    wider = dataclasses.replace(config, model=dataclasses.replace(config.model, model_channels=32))
    with pytest.raises(ValueError, match="differs from this run's"):
        unet_task(wider, vae, text_encoder, ShapesWorld(1, SIZE), init)
    run = tmp_path / "unet"
    train_unet(tiny("unet", init=str(trained / "unet"), steps=1, sample_every=0, **parts), run)
    assert json.loads((run / "config.json").read_text())["init"] == os.path.relpath(trained / "unet", run)


def test_two_objects_fraction_sets_the_shapes_mix():
    """two_objects_fraction reaches the training and held-out shapes worlds; out-of-range values are refused."""
    dataset, heldout = open_datasets(tiny("vae", two_objects_fraction=1.0))
    assert all(len(world.scene_at(i).objects) == 2 for world in (dataset, heldout) for i in range(20))
    assert open_datasets(tiny("vae"))[0].two_objects_fraction == 0.3
    with pytest.raises(ValueError, match="two_objects_fraction must be a number between 0 and 1"):
        tiny("unet", two_objects_fraction=1.5)
