"""Prompts -> what the UNet takes besides the latents and the timestep, one piece per model family.

A model family differs in how text reaches the UNet: SD 1.x/2.x run one CLIP text encoder whose per-token
vectors are the whole conditioning; SDXL runs two and adds a vector (pooled text and image sizes) to the
timestep embedding. The pipeline never knows which: it asks the model's `Conditioner` for a `Cond` of the
prompt (and of the negative prompt when guiding) and hands it to the UNet.

Every conditioner holds the textual-inversion embeddings its prompts may name (``embeddings``: name ->
`Embedding`, empty by default, set by the pipeline to those `embedding_problem` finds no fault with);
each text encoder reads its own vectors of them (SDXL: clip_l's and clip_g's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .adapters.embeddings import Embedding, vectors_for
from .prompts import encode_prompts, encode_prompts_pooled
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer
from .unet import SDXL_SIZE_EMBED_DIM, timestep_embedding


@dataclass(frozen=True)
class Cond:
    """The UNet's conditioning for a batch: cross-attention context, and the added vector of families that
    have one (`UNetConfig.adm_in_channels`)."""

    context: torch.Tensor  # (B, L, context_dim): the text vectors cross-attention reads
    vector: torch.Tensor | None = None  # (B, adm_in_channels): added to the timestep embedding (SDXL)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Join conditionings along the batch (all with a vector, or none)."""
        vectors = [c.vector for c in conds]
        if any(v is None for v in vectors) and not all(v is None for v in vectors):
            raise ValueError("cannot batch conditionings with and without an added vector")
        vector = None if vectors[0] is None else torch.cat(vectors)
        return Cond(torch.cat([c.context for c in conds]), vector)

    def to(self, dtype: torch.dtype) -> Cond:
        return Cond(self.context.to(dtype), None if self.vector is None else self.vector.to(dtype))

    def rows(self, indices: Sequence[int]) -> Cond:
        """These rows of the batch, in this order (a row may repeat)."""
        index = torch.tensor(list(indices), dtype=torch.long, device=self.context.device)
        return Cond(self.context[index], None if self.vector is None else self.vector[index])


class Conditioner(Protocol):
    """A model family's prompt encoder: (prompt, negative prompt or None when not guiding) -> their Conds.
    `size` is the image's (height, width), for families that condition on it. `embeddings` are the
    textual-inversion embeddings its prompts may name (name -> Embedding)."""

    embeddings: dict[str, Embedding]

    def __call__(
        self, prompt: str, negative: str | None, *, clip_skip: int, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]: ...

    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None, *, clip_skip: int, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]:
        """Several texts of each side in one text-encoder batch (all padded to the same chunk count): a Cond of
        len(prompts) rows, and one of len(negatives) rows (None when `negatives` is None). Calling the
        conditioner is this with one text each."""
        ...

    def models(self) -> dict[str, nn.Module]:
        """Its networks by part name (e.g. "text_encoder"), as the checkpoint names them; each is also the
        conditioner's attribute of that name (the pipeline swaps one in when it reads it again)."""
        ...


def encode_one(
    conditioner: Conditioner, prompt: str, negative: str | None, *, clip_skip: int, size: tuple[int, int]
) -> tuple[Cond, Cond | None]:
    """A conditioner's call: one prompt and its negative prompt (or None) through its `encode`, in one
    text-encoder batch, so they are padded to the same chunk count."""
    return conditioner.encode([prompt], None if negative is None else [negative], clip_skip=clip_skip, size=size)


@dataclass
class ClipConditioner:
    """SD 1.x / 2.x: one CLIP text encoder, A1111's prompt syntax; its 77 * k vectors are the whole Cond."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    __call__ = encode_one

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None, *, clip_skip: int, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]:
        vectors = vectors_for(self.embeddings, self.models(), "text_encoder")
        texts = [*prompts, *(negatives or [])]
        context = encode_prompts(self.text_encoder, self.tokenizer, texts, clip_skip, embeddings=vectors)
        n = len(prompts)
        return Cond(context[:n]), (None if negatives is None else Cond(context[n:]))

    def models(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}


@dataclass
class SDXLConditioner:
    """SDXL: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, each read at its penultimate layer without the final
    norm, their vectors joined (77 * k x 2048); the added vector is bigG's pooled text (its first chunk) and
    the image size conditioning: original size (h, w), crop top-left (0, 0), target size (h, w), each number
    a `size_embed_dim`-wide sinusoidal embedding (6 x 256 + 1280 = 2816). An empty negative prompt gives
    zeros for its text vectors and pooled text (diffusers' `force_zeros_for_empty_prompt`, as A1111 does; of
    several negative texts, a prompt schedule's, only when all are empty, as A1111 decides per batch); its
    size conditioning stays. `clip_skip` steps further back from the penultimate layer, as diffusers'."""

    tokenizer: Tokenizer  # ViT-L's: pads with the end token
    text_encoder: TextEncoder
    tokenizer_2: Tokenizer  # bigG's: pads with "!" (id 0)
    text_encoder_2: TextEncoder
    size_embed_dim: int = SDXL_SIZE_EMBED_DIM
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    __call__ = encode_one

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None, *, clip_skip: int, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]:
        n, prompts = len(prompts), [*prompts, *(negatives or [])]
        models = self.models()
        first = encode_prompts_pooled(
            self.text_encoder, self.tokenizer, prompts, clip_skip + 1, final_norm=False,
            embeddings=vectors_for(self.embeddings, models, "text_encoder"),
        )[0]  # fmt: skip
        second, pooled = encode_prompts_pooled(
            self.text_encoder_2, self.tokenizer_2, prompts, clip_skip + 1, final_norm=False, pooled=True,
            embeddings=vectors_for(self.embeddings, models, "text_encoder_2"),
        )  # fmt: skip
        context = torch.cat([first, second.to(first.dtype)], dim=-1)
        if negatives is not None and all(text == "" for text in negatives):
            context[n:], pooled[n:] = 0, 0
        height, width = size
        numbers = [[height, width, 0, 0, height, width]] * len(prompts)  # original size, crop, target size
        return _split(context, pooled, size_embedding(numbers, self.size_embed_dim), n, negatives is not None)

    def models(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


@dataclass
class RefinerConditioner:
    """SDXL's refiner: OpenCLIP ViT-bigG alone (its penultimate layer without the final norm, 77 * k x 1280);
    the added vector is its pooled text and original size (h, w), crop top-left (0, 0) and an aesthetic score,
    6.0 for the prompt and 2.5 for the negative prompt (5 x 256 + 1280 = 2560), as diffusers' refiner
    pipeline and A1111 use it. An empty negative prompt is encoded as text (its published pipeline does not
    zero it). Its tower is SDXL's second: an SDXL embedding gives it its clip_g vectors."""

    tokenizer: Tokenizer  # bigG's: pads with "!" (id 0)
    text_encoder: TextEncoder
    size_embed_dim: int = SDXL_SIZE_EMBED_DIM
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    __call__ = encode_one

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negatives: Sequence[str] | None, *, clip_skip: int, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]:
        n, prompts = len(prompts), [*prompts, *(negatives or [])]
        context, pooled = encode_prompts_pooled(
            self.text_encoder, self.tokenizer, prompts, clip_skip + 1, final_norm=False, pooled=True,
            embeddings=vectors_for(self.embeddings, self.models(), "text_encoder"),
        )  # fmt: skip
        height, width = size
        scores = [self.aesthetic_score] * n + [self.negative_aesthetic_score] * (len(prompts) - n)
        numbers = [[height, width, 0, 0, score] for score in scores]  # original size, crop, aesthetic score
        return _split(context, pooled, size_embedding(numbers, self.size_embed_dim), n, negatives is not None)

    def models(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}


def size_embedding(numbers: list[list[float]], dim: int) -> torch.Tensor:
    """(B, n) numbers (sizes, crops, scores) -> (B, n * dim): each number's sinusoidal embedding, in order."""
    values = torch.tensor(numbers, dtype=torch.float32)
    return timestep_embedding(values.flatten(), dim).reshape(len(numbers), -1)


def _split(
    context: torch.Tensor, pooled: torch.Tensor, sizes: torch.Tensor, n: int, guided: bool
) -> tuple[Cond, Cond | None]:
    """The prompts' Cond (the first n rows) and, when guided, the negative prompts': context, and pooled text +
    size embeddings."""
    vector = torch.cat([pooled.to(context.dtype), sizes.to(context)], dim=-1)
    cond = Cond(context[:n], vector[:n])
    return cond, (Cond(context[n:], vector[n:]) if guided else None)
