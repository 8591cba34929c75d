"""The image side of CLIP for `latentforge explain`: a batch of images against their captions.

`read_clip(run)` loads a CLIP model from the run folder `latentforge train clip` wrote (the shipped model keeps
only the text tower, so the image tower comes from a training run), and `image_caption_similarity` draws a
batch of captioned images from the data that run was trained on and measures every image against every
caption. No drawing happens here: the page (explain/__init__.py) plots the returned tensors and images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..images import image_to_tensor, tensor_to_images
from ..tokenizer import Tokenizer
from ..training.clip import CLIPModel
from ..training.configs import CONFIG_FILE, CONFIGS, CLIPTrainConfig, config_from_dict, load_run_config
from ..training.data import Item, open_heldout, stream
from ..training.loop import checkpoint_weights, latest_checkpoint
from ..training.world import ShapesWorld
from ..weightfiles import check_weights_of

SEED_STRIDE = 1_000_000  # shapes world: seed s reads the held-out items from s * SEED_STRIDE on
SCAN_FACTOR = 50  # shapes world: at most count * SCAN_FACTOR items are read looking for distinct captions
NOT_A_RUN = "not a CLIP training run folder with a checkpoint; give the folder `latentforge train clip` wrote"
CHANGED = "its config or checkpoint was changed: give the folder as `latentforge train clip` wrote it"


@dataclass
class ClipBatch:
    """Images and their captions, pair i being image i and caption i, and how alike CLIP finds each image and caption."""

    images: list[Image.Image]  # count RGB images, as the model saw them
    captions: list[str]  # count distinct captions
    similarity: torch.Tensor  # (count, count) float32 cosine similarities: rows images, columns captions


# --------------------------------------------------------------------------- the model


def read_clip(source: str | Path) -> tuple[CLIPModel, CLIPTrainConfig]:
    """The CLIP model of a `latentforge train clip` run folder and that run's config.

    The weights are the trained ones (not the EMA) of the run's latest checkpoint, loaded strictly; the model
    is float32, on the CPU, in eval mode and frozen. Raises a one-line ValueError for anything else."""
    run_dir = Path(source)
    if not run_dir.is_dir() or _checkpoint(run_dir) is None:
        raise ValueError(f"{run_dir}: {NOT_A_RUN}")
    config = _clip_config(run_dir)
    eos_id = Tokenizer(max_length=config.text.max_length).eos_id
    weights = checkpoint_weights(run_dir)
    check_weights_of(lambda: CLIPModel(config, eos_id), weights, run_dir, "CLIP", CHANGED)
    with torch.random.fork_rng(devices=[]):  # the model's random initialisation leaves the caller's RNG alone
        model = CLIPModel(config, eos_id).float()
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False), config


def _checkpoint(run_dir: Path) -> Path | None:
    """The run folder's latest checkpoint folder (None: there is none), its pointer file checked to be readable."""
    try:
        return latest_checkpoint(run_dir)
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{run_dir}: its checkpoints/latest.json is unreadable; the run folder was damaged") from None


def _clip_config(run_dir: Path) -> CLIPTrainConfig:
    """The run's config.json as a CLIP config; a one-line ValueError when it is missing or another trainer's."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir}: no {CONFIG_FILE} beside its checkpoints; give the folder `latentforge train clip` wrote"
        )
    try:
        return load_run_config("clip", run_dir)
    except ValueError as error:
        kind = _trainer_of(path)
        if kind is not None:
            raise ValueError(
                f"{run_dir}: a {kind} training run folder, not a CLIP one; give the folder `latentforge train clip` wrote"
            ) from None
        raise ValueError(f"{path}: not a CLIP training config ({error})") from None


def _trainer_of(path: Path) -> str | None:
    """Which trainer (vae, unet, ...) wrote this config.json, when its keys are some trainer's; else None."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for kind in CONFIGS:
        try:
            config_from_dict(kind, values)
        except (ValueError, TypeError):
            continue
        return kind
    return None


# --------------------------------------------------------------------------- the batch


@torch.no_grad()
def image_caption_similarity(model: CLIPModel, config: CLIPTrainConfig, count: int = 6, seed: int = 0) -> ClipBatch:
    """`count` captioned images of the run's held-out data, and the cosine similarity of every image to every
    caption: encode_image(images) @ encode_text(captions).T, matching pairs on the diagonal.

    The data is what `open_datasets` gives the trainer for held-out checks, at the run's image size: for the
    shapes world, the world of seed config.seed + HELDOUT_SEED_OFFSET (never trained on), read from item
    seed * SEED_STRIDE on; for a caption folder (its own held-out set), the folder in the seeded random order
    the trainer reads an epoch in, with `seed` as the order's seed, at most one pass. Items whose caption
    was already taken are skipped, so the captions are distinct and only the diagonal pairs belong together.
    The images are measured as returned: the PIL images turned back into [-1, 1] tensors as the trainer's
    data makes them (x / 255 * 2 - 1), which gives the data's own tensors back exactly.
    Raises a one-line ValueError for a bad count or seed, or data with too few distinct captions."""
    _check_whole("count", count, 1)
    _check_whole("seed", seed, 0)
    data = _heldout(config)
    limit = count * SCAN_FACTOR if isinstance(data, ShapesWorld) else len(data)
    pairs = _distinct(islice(_order(data, seed), limit), count)
    if len(pairs) < count:
        raise ValueError(
            f"{_describe(data)}: only {len(pairs)} distinct captions found among {limit} items; "
            f"ask for count {len(pairs)} or fewer"
        )
    images = tensor_to_images(torch.stack([image for image, _ in pairs]))
    captions = [text for _, text in pairs]
    return ClipBatch(images, captions, _similarity(model, config, images, captions))


def _check_whole(name: str, value: object, low: int) -> None:
    """Raise a one-line ValueError unless value is an int >= low (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


def _heldout(config: CLIPTrainConfig) -> Any:
    """The run's held-out data as `open_datasets` opens it; a one-line ValueError when its caption folder is gone."""
    if config.data != "shapes" and not Path(config.data).is_dir():
        raise ValueError(
            f"{config.data}: the caption folder this CLIP run was trained on is not there; "
            "run from the folder training ran in, or put the folder back"
        )
    return open_heldout(config.data, config.image_size, config.seed, config.two_objects_fraction)


def _order(data: object, seed: int) -> Iterator[Item]:
    """The held-out items in the order the batch is drawn from (see image_caption_similarity)."""
    if isinstance(data, ShapesWorld):
        return data.iterate(seed * SEED_STRIDE, 1)
    return stream(data, 0, 1, seed)


def _distinct(items: Iterator[Item], count: int) -> list[Item]:
    """The first `count` items whose captions differ from every earlier kept item's (fewer if the items run out)."""
    kept: list[Item] = []
    seen: set[str] = set()
    for image, text in items:
        if text not in seen:
            kept.append((image, text))
            seen.add(text)
            if len(kept) == count:
                break
    return kept


def _describe(data: object) -> str:
    """The held-out data in a few words, for messages."""
    if isinstance(data, ShapesWorld):
        return f"the held-out shapes world (seed {data.seed})"
    return str(getattr(data, "root", type(data).__name__))


def _similarity(
    model: CLIPModel, config: CLIPTrainConfig, images: list[Image.Image], captions: list[str]
) -> torch.Tensor:
    """(images, captions) cosine similarities of the unit embeddings, float32 on the CPU (clamped to [-1, 1]:
    rounding can take a product of unit vectors a hair past 1)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = torch.cat([image_to_tensor(image) for image in images]).to(device, dtype)
    ids = Tokenizer(max_length=config.text.max_length)(captions).to(device)
    similarity = model.encode_image(pixels) @ model.encode_text(ids).T
    return similarity.float().cpu().clamp(-1.0, 1.0)
