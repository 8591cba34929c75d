"""Textual-inversion embeddings: files of learned token vectors that a prompt uses by name.

An embedding is n vectors per text encoder. A prompt names it by its file's stem, as in A1111
(``my-style.pt`` is written ``my-style``); `prompts.chunk_prompt` finds the name and gives the vectors
n token slots. The formats read, every one through the safe reader of `weightfiles`:

* A1111 ``.pt`` / ``.bin``: ``{"string_to_param": {"*": (n, width)}, "name": ..., "step": ...}`` (the
  ``name`` field is informational: A1111, and this module, use the file's name);
* A1111 ``.safetensors``: ``{"emb_params": (n, width)}``;
* SDXL: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one set of vectors for each tower;
* diffusers' ``learned_embeds.bin`` / ``.safetensors``: ``{token: (width,) or (n, width)}``.

Vectors are kept by the text encoder part that takes them: "text_encoder" (SD 1.x/2.x, SDXL's clip_l)
and "text_encoder_2" (SDXL's clip_g). Which of them a loaded text encoder takes follows from the model
itself (`embedding_key`): OpenCLIP bigG as SDXL uses it is the tower with a projection, SDXL's
text_encoder_2 and the refiner's only text encoder alike, and it takes the clip_g vectors; every other
tower takes "text_encoder". So an SDXL embedding works on the refiner too, through its clip_g vectors.

The pipeline reads files with `read_embedding`, checks each against the model with `embedding_problem`
and puts the ones that fit in its conditioner's ``embeddings`` (name -> Embedding); `vectors_for` is what
a conditioner hands each text encoder. `prompts.embeddings_in` lists the names a prompt uses.

Not read: embeddings stored inside PNG/WebP images, and the original textual-inversion repository's
``.pt`` files whose vectors are an ``nn.ParameterDict`` (the weights-only unpickler refuses the class).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..weightfiles import CheckpointError, PathLike, detect_format, read_pickle, read_state_dict

__all__ = ["Embedding", "embedding_key", "embedding_problem", "read_embedding", "vectors_for"]

# SDXL files name their towers by the CLIP model; we name them by the diffusers part that takes them.
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_FORMATS = (
    "'string_to_param' (A1111 .pt), 'emb_params' (A1111 .safetensors), 'clip_l' + 'clip_g' (SDXL) or one token "
    "(diffusers)"
)


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: the name a prompt uses, its vectors by text-encoder part, its file."""

    name: str  # the file's stem, as A1111 names embeddings
    vectors: dict[str, Tensor]  # "text_encoder" / "text_encoder_2" -> (n, width), n equal for every part
    path: str

    @property
    def n_vectors(self) -> int:
        """Token slots the embedding takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]


def read_embedding(path: PathLike) -> Embedding:
    """Read a textual-inversion file of any format in the module docstring; CheckpointError says what is wrong."""
    if detect_format(path) == "safetensors":
        data: object = read_state_dict(path)[0]
    else:
        data = read_pickle(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not an embedding's dict", _NOT_AN_EMBEDDING)
    vectors = {part: _checked(path, key, tensor) for part, (key, tensor) in _find_vectors(path, data).items()}
    counts = {tensor.shape[0] for tensor in vectors.values()}
    if len(counts) > 1:
        sizes = " and ".join(f"{key} {tensor.shape[0]}" for key, tensor in zip(_SDXL_KEYS, vectors.values()))
        raise CheckpointError(path, f"has a different number of vectors per tower ({sizes})", _REDOWNLOAD)
    return Embedding(name=Path(path).stem, vectors=vectors, path=os.fspath(path))


_NOT_AN_EMBEDDING = "use a textual-inversion embedding file (LoRAs and models load elsewhere)"
_REDOWNLOAD = "the file is damaged or not an embedding; download it again"


def _find_vectors(path: PathLike, data: Mapping) -> dict[str, tuple[str, object]]:
    """Part name -> (the file's key, its value), by the layout the keys show."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise CheckpointError(
                path, f"'string_to_param' must hold one entry, it holds {count}", "use an A1111 embedding of one token"
            )
        key, value = next(iter(params.items()))
        return {"text_encoder": (f"string_to_param[{key!r}]", value)}
    if "emb_params" in data:
        return {"text_encoder": ("emb_params", data["emb_params"])}
    if "clip_l" in data or "clip_g" in data:
        missing = [key for key in _SDXL_KEYS if key not in data]
        if missing:
            raise CheckpointError(path, f"an SDXL embedding without {missing[0]!r}", "it needs both clip_l and clip_g")
        return {part: (key, data[key]) for key, part in _SDXL_KEYS.items()}
    tensors = [key for key, value in data.items() if isinstance(value, torch.Tensor)]
    if len(data) == 1 and tensors:  # diffusers: {token: vectors}
        return {"text_encoder": (str(tensors[0]), data[tensors[0]])}
    keys = ", ".join(repr(key) for key in list(data)[:8]) + (", ..." if len(data) > 8 else "")
    cause = f"has no embedding vectors (keys: {keys or 'none'}); expected {_FORMATS}"
    raise CheckpointError(path, cause, _NOT_AN_EMBEDDING)


def _checked(path: PathLike, key: str, value: object) -> Tensor:
    """The vectors as (n, width): a (width,) vector is one row; refuses anything else, and NaN or inf."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(path, f"{key} is a {type(value).__name__}, not a tensor of vectors", _REDOWNLOAD)
    if not value.dtype.is_floating_point:
        raise CheckpointError(path, f"{key} holds {value.dtype} numbers, not floating-point vectors", _REDOWNLOAD)
    vectors = value.detach().unsqueeze(0) if value.dim() == 1 else value.detach()
    if vectors.dim() != 2 or 0 in vectors.shape:
        raise CheckpointError(path, f"{key} has shape {tuple(value.shape)}, not (vectors, width)", _REDOWNLOAD)
    if not torch.isfinite(vectors).all():
        raise CheckpointError(path, f"{key} holds NaN or infinite values", "its training diverged; use another embedding")
    return vectors


def embedding_key(model: nn.Module) -> str:
    """Which of an embedding's vectors a text encoder takes: "text_encoder_2" (SDXL's clip_g) for OpenCLIP
    bigG as SDXL uses it, the tower with a projection (SDXL's second, the refiner's only one), else
    "text_encoder"."""
    return "text_encoder" if getattr(model, "text_projection", None) is None else "text_encoder_2"


def embedding_problem(embedding: Embedding, models: Mapping[str, nn.Module]) -> str | None:
    """Why the embedding cannot be used with these text encoders (a conditioner's `models()`), or None."""
    wanted = {embedding_key(model): model.config.width for model in models.values()}  # key -> width
    have = {key: vectors.shape[1] for key, vectors in embedding.vectors.items()}
    if ("text_encoder_2" in have) != ("text_encoder_2" in wanted):
        return (
            f"{embedding.name!r} is {_describe_embedding(have)} and this model is {_describe_model(wanted)}: "
            f"use an embedding made for {'SDXL' if 'text_encoder_2' in wanted else 'SD 1.x/2.x'}"
        )
    for key, width in wanted.items():
        if have[key] != width:
            tower = "" if len(have) == 1 else f" ({_TOWERS[key]})"
            return (
                f"{embedding.name!r} has {have[key]}-wide vectors{tower}; this model's text encoder is {width} wide: "
                "use an embedding made for this model's family"
            )
    return None


_TOWERS = {part: key for key, part in _SDXL_KEYS.items()}  # part -> SDXL's tower name


def _describe_embedding(widths: Mapping[str, int]) -> str:
    """E.g. "an SDXL embedding (clip_l 768 + clip_g 1280)" or "an SD 1.x/2.x embedding (768 wide)"."""
    if "text_encoder_2" in widths:
        return f"an SDXL embedding (clip_l {widths['text_encoder']} + clip_g {widths['text_encoder_2']})"
    return f"an SD 1.x/2.x embedding ({widths['text_encoder']} wide)"


def _describe_model(widths: Mapping[str, int]) -> str:
    """E.g. "SDXL (clip_l 768 + clip_g 1280)", "the SDXL refiner (clip_g 1280)", "SD 1.x/2.x (text width 768)"."""
    if "text_encoder" not in widths:
        return f"the SDXL refiner (clip_g {widths['text_encoder_2']})"
    if "text_encoder_2" in widths:
        return f"SDXL (clip_l {widths['text_encoder']} + clip_g {widths['text_encoder_2']})"
    return f"SD 1.x/2.x (text width {widths['text_encoder']})"


def vectors_for(
    embeddings: Mapping[str, Embedding], models: Mapping[str, nn.Module], part: str
) -> dict[str, Tensor]:
    """Name -> (n, width) vectors that the text encoder ``models[part]`` takes, for every embedding; a
    ValueError names one these text encoders cannot use (the pipeline leaves those out)."""
    for name, embedding in embeddings.items():
        problem = embedding_problem(embedding, models)
        if problem:
            raise ValueError(f"{problem} (leave {name!r} out of the conditioner's embeddings)")
    key = embedding_key(models[part])
    return {name: embedding.vectors[key] for name, embedding in embeddings.items()}
