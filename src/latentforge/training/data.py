"""Datasets for the trainers: opening them by name, and cutting the stream into per-rank batches.

A dataset is either endless with `iterate(start, step)` (the shapes world: item i is a function of
(seed, i)), or finite with `__len__` / `__getitem__` (a caption folder), read in a fresh seeded
permutation each epoch. Either way the training stream is indexed by the number of samples
consumed so far, which is all a checkpoint needs to store to resume the same data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from .world import CaptionFolder, ShapesWorld

Item = tuple[torch.Tensor, str]  # (image (3, H, W) in [-1, 1], caption)
HELDOUT_SEED_OFFSET = 1_000_003  # the held-out shapes world is drawn with seed + this


def open_dataset(spec: str, size: int, seed: int, two_objects_fraction: float) -> Any:
    """'shapes' -> ShapesWorld(seed, size, two_objects_fraction); anything else is a folder of images
    with .txt captions."""
    if spec == "shapes":
        return ShapesWorld(seed, size, two_objects_fraction)
    return CaptionFolder(spec, size)


def open_heldout(spec: str, size: int, seed: int, two_objects_fraction: float) -> Any:
    """Data for held-out checks: the shapes world under another seed; a folder is its own held-out set."""
    if spec == "shapes":
        return ShapesWorld(seed + HELDOUT_SEED_OFFSET, size, two_objects_fraction)
    return CaptionFolder(spec, size)


def open_datasets(config: Any, dataset: Any = None, heldout: Any = None) -> tuple[Any, Any]:
    """(training data, held-out data) of a trainer config (its data, image_size, seed, two_objects_fraction),
    unless given."""
    if dataset is None:
        dataset = open_dataset(config.data, config.image_size, config.seed, config.two_objects_fraction)
    if heldout is None:
        heldout = open_heldout(config.data, config.image_size, config.seed, config.two_objects_fraction)
    return dataset, heldout


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed made from several integers: the seed, a number naming the use, its index (epoch, step)."""
    value = 0x243F6A8885A308D3
    for n in numbers:
        value = (value * 0x9E3779B97F4A7C15 + n + 1) % (1 << 63)
    return value


def stream(dataset: Any, start: int, stride: int, seed: int) -> Iterator[Item]:
    """Items start, start + stride, ... of the dataset's training order, forever."""
    if hasattr(dataset, "iterate"):
        yield from dataset.iterate(start, stride)
        return
    n = len(dataset)
    orders: dict[int, torch.Tensor] = {}
    index = start
    while True:
        epoch, position = divmod(index, n)
        if epoch not in orders:
            orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0, epoch)))}
        yield dataset[int(orders[epoch][position])]
        index += stride


def batches(
    dataset: Any, start: int, global_batch: int, rank: int, world: int, seed: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """This rank's part of each global batch, from sample `start` on: (images (b, 3, H, W), b captions).

    Rank r of n takes the samples at positions r, r + n, r + 2n, ... of each global batch; StepRandom
    slices its draws the same way, so every sample meets the same noise whatever the rank count."""
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} must be a multiple of the number of processes ({world})")
    local = global_batch // world
    items = stream(dataset, start + rank, world, seed)
    while True:
        chunk = [next(items) for _ in range(local)]
        yield torch.stack([image for image, _ in chunk]), [text for _, text in chunk]


def take(dataset: Any, count: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The first `count` items of the dataset's order under `seed`: (images (count, 3, H, W), captions)."""
    items = list(islice(stream(dataset, 0, 1, seed), count))
    return torch.stack([image for image, _ in items]), [text for _, text in items]
