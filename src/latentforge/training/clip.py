"""Training a CLIP text tower with a small image tower by symmetric contrastive (InfoNCE) loss.

The text tower is latentforge's own TextEncoder (Stable Diffusion's architecture); its pooled output is
the hidden state at the end token (the first end-token id in each row), as in CLIP. Only the text
tower is exported: the UNet trainer reads its per-token output (last layer + final norm) as context.
Under data parallelism the embeddings are gathered (with gradients) from every rank, so the loss
always compares the whole global batch, exactly as one process would.
"""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from ..images import image_strip, tensor_to_images
from ..text_encoder import TextEncoder
from ..tokenizer import Tokenizer
from .configs import CLIPTrainConfig, ImageEncoderConfig, run_relative
from .data import open_datasets, take
from .loop import (
    EXPORTS,
    SINGLE_PROCESS,
    Dist,
    Report,
    Result,
    StepRandom,
    Task,
    checkpoint_weights,
    stack_rows,
    train,
    write_part,
    write_png,
)
from .world import ShapesWorld

RETRIEVED = 3  # images shown per caption in the report


class ResidualConv(nn.Module):
    """x + conv(silu(norm(x))): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x + self.conv(F.silu(self.norm(x)))


class ImageEncoder(nn.Module):
    """Small CNN: images (B, 3, H, W) -> features (B, channels[-1] * pooled_size ** 2).

    A strided convolution and a residual convolution per stage, then average pooling to a small grid
    (not to 1 x 1: where a shape is, is half of what the captions say)."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        widths, groups = config.channels, config.norm_groups
        # every stage, the first included, halves the resolution: 64 px -> 32, 16, 8, 4
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), ResidualConv(widths[0], groups)]
        for c_in, c_out in pairwise(widths):
            layers += [
                nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                ResidualConv(c_out, groups),
            ]  # fmt: skip
        layers += [nn.GroupNorm(groups, widths[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(config.pooled_size), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1] * config.pooled_size**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_features)."""
        return self.layers(images)


def pool_at_eos(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The hidden state at each row's first end token: (B, T, width), (B, T) -> (B, width)."""
    first = (ids == eos_id).int().argmax(dim=1)
    return hidden[torch.arange(len(ids), device=ids.device), first]


class CLIPModel(nn.Module):
    """Text and image towers with projections to a shared space and a learned temperature."""

    def __init__(self, config: CLIPTrainConfig, eos_id: int) -> None:
        super().__init__()
        self.text = TextEncoder(config.text)
        self.image = ImageEncoder(config.image)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.image_projection = nn.Linear(self.image.out_features, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.max_logit_scale = config.max_logit_scale
        self.eos_id = eos_id
        # CLIP's initialisation of the embeddings (PyTorch's default is N(0, 1))
        nn.init.normal_(self.text.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.embeddings.position_embedding.weight, std=0.01)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> unit embeddings (B, embed_dim), pooled at the end token.

        Attention is causal, so positions after the last end token cannot change the pooled states:
        they are cut off, which gives the same result (and gradients) for less work."""
        length = int((ids == self.eos_id).int().argmax(dim=1).max()) + 1
        ids = ids[:, :length]
        pooled = pool_at_eos(self.text(ids), ids, self.eos_id)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> unit embeddings (B, embed_dim)."""
        return F.normalize(self.image_projection(self.image(images)), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), the scale kept at most exp(max_logit_scale): ()."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: row i of each (B, E) is a pair; -> ()."""
    logits = scale * image_emb @ text_emb.T  # (B images, B texts)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class GatherRows(torch.autograd.Function):
    """All ranks' rows, rank 0's first: (b, E) -> (world * b, E). Every rank computes the same loss on
    them, so the gradient of a rank's own rows is the sum of all ranks' gradients for those rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        """(b, E) -> (world * b, E)."""
        ctx.rows = slice(torch_dist.get_rank() * len(x), (torch_dist.get_rank() + 1) * len(x))
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        """(world * b, E) -> (b, E): the summed gradient of this rank's rows."""
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad)
        return grad[ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank with gradients flowing back to their rank (identity in one process)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return x
    return GatherRows.apply(x)


class CLIPObjective(nn.Module):
    """Images (b, 3, H, W) and ids (b, 77) -> InfoNCE over the global batch (gathered from every rank)."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), {"accuracy": () in-batch text -> image top-1, "scale": ()})."""
        image_emb = gather(self.model.encode_image(images))
        text_emb = gather(self.model.encode_text(ids))
        scale = self.model.scale()
        loss = contrastive_loss(image_emb, text_emb, scale)
        with torch.no_grad():
            hits = (text_emb @ image_emb.T).argmax(dim=1) == torch.arange(len(text_emb), device=text_emb.device)
        return loss, {"accuracy": hits.float().mean(), "scale": scale.detach()}


@torch.no_grad()
def retrieval(model: CLIPModel, images: torch.Tensor, ids: torch.Tensor, captions: list[str]) -> tuple[float, torch.Tensor]:
    """Caption -> image top-1 accuracy within the batch, and each caption's images ranked (N, N).

    A retrieved image counts as right when its own caption is the query's (the same caption can
    describe two images of a batch)."""
    device = next(model.parameters()).device
    similarity = model.encode_text(ids.to(device)) @ model.encode_image(images.to(device)).T  # (texts, images)
    ranked = similarity.argsort(dim=1, descending=True).cpu()
    right = [captions[int(ranked[i, 0])] == captions[i] for i in range(len(captions))]
    return sum(right) / len(right), ranked


def _report(
    config: CLIPTrainConfig, heldout: tuple[torch.Tensor, list[str]], twins: tuple[torch.Tensor, list[str]] | None,
    tokenizer: Tokenizer,
) -> Report:  # fmt: skip
    """Held-out retrieval accuracy (and on scene / twin pairs, when the data is the shapes world); the
    image shows a few captions' own images, then the images each retrieves."""
    images, captions = heldout
    ids = tokenizer(captions)
    twin_ids = tokenizer(twins[1]) if twins is not None else None
    big = tensor_to_images(F.interpolate(images.float(), scale_factor=2, mode="nearest"))

    def report(model: nn.Module, path: Path) -> dict[str, float]:
        accuracy, ranked = retrieval(model, images, ids, captions)
        rows = []
        for i in range(min(config.sample_count, len(captions))):
            top = [int(j) for j in ranked[i, :RETRIEVED]]
            marks = [f"{'=' if captions[j] == captions[i] else 'x'} {n}" for n, j in enumerate(top, 1)]
            rows.append(image_strip([big[i]] + [big[j] for j in top], [captions[i], *marks]))
        write_png(stack_rows(rows), path)
        if twins is None:
            return {"retrieval_top1": accuracy}
        return {"retrieval_top1": accuracy, "twin_retrieval_top1": retrieval(model, twins[0], twin_ids, twins[1])[0]}

    return report


def clip_task(config: CLIPTrainConfig, heldout: Any, init: dict[str, torch.Tensor] | None = None) -> Task:
    """The CLIP trainer as a Task for the shared loop (model initialised from config.seed, or set to init)."""
    tokenizer = Tokenizer(max_length=config.text.max_length)
    torch.manual_seed(config.seed)
    model = CLIPModel(config, tokenizer.eos_id)
    if init is not None:
        model.load_state_dict(init, strict=True)
    twins = take(heldout.paired(), config.eval_count) if isinstance(heldout, ShapesWorld) else None

    def inputs(images: torch.Tensor, captions: list[str], draws: StepRandom) -> dict[str, torch.Tensor]:
        return {"images": images, "ids": tokenizer(captions).to(images.device)}

    def finish(trained: nn.Module, run_dir: Path) -> None:
        write_part(trained.text, config.text, "text_encoder", run_dir / EXPORTS["text_encoder"])

    return Task(
        name="clip",
        model=model,
        objective=CLIPObjective(model),
        inputs=inputs,
        report=_report(config, take(heldout, config.eval_count), twins, tokenizer),
        finish=finish,
    )


def train_clip(
    config: CLIPTrainConfig, run_dir: str | Path, dist: Dist = SINGLE_PROCESS, resume: bool = False, dataset: Any = None,
    heldout: Any = None,
) -> Result:  # fmt: skip
    """Train CLIP into run_dir; at the end run_dir/text_encoder.safetensors holds the text tower."""
    dataset, heldout = open_datasets(config, dataset, heldout)
    if config.hard_negatives:
        if not isinstance(dataset, ShapesWorld):
            raise ValueError(f"hard_negatives needs the shapes world as training data, got {type(dataset).__name__}")
        dataset = dataset.paired()
    init = None
    if config.init:  # read now; the run's config.json keeps the path relative to the run folder
        init = checkpoint_weights(config.init)
        config = dataclasses.replace(config, init=run_relative(config.init, run_dir))
    return train(clip_task(config, heldout, init), config, run_dir, dataset, dist, resume)

