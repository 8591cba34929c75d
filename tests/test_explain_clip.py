"""explain's CLIP image side: a CLIP run folder is read back exactly, its similarity matrix is what the model
says of the returned images and captions, and anything but a CLIP run folder gets a one-line error."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_training import SIZE, tiny

from latentforge.explain.clip import ClipBatch, image_caption_similarity, read_clip
from latentforge.images import image_to_tensor
from latentforge.tokenizer import Tokenizer
from latentforge.training import loop
from latentforge.training.clip import train_clip
from latentforge.training.data import HELDOUT_SEED_OFFSET
from latentforge.training.vae import train_vae
from latentforge.training.world import ShapesWorld, draw, sample_scene
from latentforge.weightfiles import read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    """Two steps of tiny CLIP on 16 x 16 shapes, with an EMA so that the EMA and the trained weights differ."""
    run = tmp_path_factory.mktemp("explain-clip") / "clip"
    train_clip(tiny("clip", steps=2, sample_every=0, ema_decay=0.5), run)
    return run


@pytest.fixture(scope="module")
def clip(clip_run):
    """(model, config) of the tiny run."""
    return read_clip(clip_run)


def test_read_clip_loads_the_trained_checkpoint_weights(clip_run, clip):
    """The model holds the latest checkpoint's trained weights (not the EMA), float32, CPU, eval, frozen; the
    config is the run's; reading leaves the global random state alone."""
    model, config = clip
    weights = loop.checkpoint_weights(clip_run)
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    ema = read_state_dict(loop.latest_checkpoint(clip_run) / "ema.safetensors")[0]
    assert any(not torch.equal(state[k], ema[k]) for k in ema)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, "cpu")}
    assert config == tiny("clip", steps=2, sample_every=0, ema_decay=0.5)
    before = torch.random.get_rng_state()
    read_clip(str(clip_run))
    assert torch.equal(torch.random.get_rng_state(), before)


def recomputed(model, config, batch: ClipBatch) -> torch.Tensor:
    """encode_image(images) @ encode_text(captions).T from the returned PIL images and captions."""
    pixels = torch.cat([image_to_tensor(image) for image in batch.images])  # (N, 3, H, W) in [-1, 1]
    ids = Tokenizer(max_length=config.text.max_length)(batch.captions)
    with torch.no_grad():
        return model.encode_image(pixels) @ model.encode_text(ids).T


def test_similarity_is_images_against_captions(clip):
    """(count, count) cosines of the returned images (rows) against the returned captions (columns)."""
    model, config = clip
    batch = image_caption_similarity(model, config, count=5, seed=3)
    assert batch.similarity.shape == (5, 5) and batch.similarity.dtype == torch.float32
    assert len(batch.images) == len(batch.captions) == 5 and len(set(batch.captions)) == 5
    assert all(image.mode == "RGB" and image.size == (SIZE, SIZE) for image in batch.images)
    torch.testing.assert_close(batch.similarity, recomputed(model, config, batch))
    assert float(batch.similarity.abs().max()) <= 1.0
    again = image_caption_similarity(model, config, count=5, seed=3)
    assert again.captions == batch.captions and torch.equal(again.similarity, batch.similarity)
    assert image_caption_similarity(model, config, count=5, seed=4).captions != batch.captions


def test_batch_is_the_heldout_shapes_world(clip):
    """Seed 0 draws the held-out world's items in order, skipping repeated captions; the PIL images turn back
    into exactly the tensors the trainer would have fed."""
    model, config = clip
    batch = image_caption_similarity(model, config, count=6, seed=0)
    heldout = ShapesWorld(config.seed + HELDOUT_SEED_OFFSET, SIZE, config.two_objects_fraction)
    items = [heldout.item(i) for i in range(6 * 50)]
    found = [next(i for i, (_, text) in enumerate(items) if text == caption) for caption in batch.captions]
    assert found[0] == 0 and found == sorted(found)
    for image, i in zip(batch.images, found, strict=True):
        assert torch.equal(image_to_tensor(image)[0], items[i][0])


def caption_folder(root: Path, captions: list[str]) -> Path:
    """A folder of shapes images, image k captioned captions[k]."""
    root.mkdir()
    for k, text in enumerate(captions):
        draw(sample_scene(random.Random(k)), SIZE).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text(text)
    return root


def test_caption_folder_run(clip, tmp_path):
    """A run trained on a caption folder draws from that folder (distinct captions); too few, or a folder
    that is gone, is one line."""
    model, config = clip
    folder = caption_folder(tmp_path / "folder", ["a cat", "a dog", "a cat", "a bird"])
    config = dataclasses.replace(config, data=str(folder))
    batch = image_caption_similarity(model, config, count=3, seed=1)
    assert sorted(batch.captions) == ["a bird", "a cat", "a dog"]
    torch.testing.assert_close(batch.similarity, recomputed(model, config, batch))
    assert image_caption_similarity(model, config, count=3, seed=1).captions == batch.captions
    with pytest.raises(ValueError, match="only 3 distinct captions") as error:
        image_caption_similarity(model, config, count=4)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)
    gone = dataclasses.replace(config, data=str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="is not there") as error:
        image_caption_similarity(model, gone)
    assert "\n" not in str(error.value) and str(tmp_path / "gone") in str(error.value)


@pytest.mark.parametrize(("count", "seed"), [(0, 0), (2, -1), (True, 0), (2, 1.5)])
def test_bad_count_or_seed(clip, count, seed):
    with pytest.raises(ValueError, match="must be a whole number"):
        image_caption_similarity(*clip, count=count, seed=seed)


def refused(source, match: str) -> str:
    """read_clip's ValueError for `source`: one line naming the path, matching `match`."""
    with pytest.raises(ValueError, match=match) as error:
        read_clip(source)
    message = str(error.value)
    assert "\n" not in message and str(source) in message
    return message


def test_read_clip_refuses_what_is_not_a_clip_run(clip_run, tmp_path):
    """An empty folder, a file, a missing path, a VAE run, a run whose config no longer fits its weights."""
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "not a CLIP training run folder with a checkpoint; give the folder `latentforge train clip` wrote")
    refused(clip_run / "config.json", "not a CLIP training run folder")
    refused(tmp_path / "missing", "not a CLIP training run folder")
    vae = tmp_path / "vae"
    train_vae(tiny("vae", steps=1, sample_every=0), vae)
    refused(vae, "a vae training run folder, not a CLIP one")
    changed = tmp_path / "changed"
    shutil.copytree(clip_run, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "embed_dim": 16}))
    refused(changed, r"CLIP weight 'image_projection.weight' has shape \(32, 128\), expected \(16, 128\); its config or "
                     "checkpoint was changed")  # fmt: skip
    (changed / "config.json").unlink()
    refused(changed, "no config.json")
