"""The add-ons one model uses: the folders that tags and names are looked up in (`library`), the LoRA networks
merged into its weights now, and the network and embedding files already read.

A Pipeline holds one (`pipe.addons`) and hands it its parts when a generation asks: strip a prompt's
`<lora:...>` tags, merge exactly the networks asked for, give the conditioner the embeddings it can use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..prompts import embeddings_in
from ..weightfiles import CheckpointError
from .embeddings import Embedding, embedding_problem, read_embedding
from .library import LORA_SUFFIXES, Library, split_tags
from .lora import Merger, Placed, Use, place, read_lora

if TYPE_CHECKING:
    from ..conditioning import Conditioner
    from ..unet import UNetConfig

KEEP_PLACED = 8  # LoRA files kept read and placed (each some MB to 100s of MB), the least recently used dropped


@dataclass
class AddOns:
    # `<lora:NAME:W>` in a prompt and `loras={"NAME": W}` are looked up in library.loras, embeddings in
    # library.embeddings
    library: Library = field(default_factory=Library)
    merger: Merger = field(default_factory=Merger, repr=False)  # the networks merged into the weights now
    placed: dict[tuple[str, int], Placed] = field(default_factory=dict, repr=False)  # by (path, mtime)
    embedding_files: dict[tuple[str, int], Embedding | str] = field(default_factory=dict, repr=False)

    def without_tags(self, prompt: str, negative: str) -> tuple[str, str, dict[Path, tuple[float, float]]]:
        """The prompts without their `<lora:...>` tags, and the tags' files in library.loras {path: (te, unet)}
        (both prompts' tags are applied, as A1111 does; a later tag of the same name wins). A tag's name is
        only ever looked up in the library, never read as a path."""
        prompt, tags = split_tags(prompt)
        negative, negative_tags = split_tags(negative)
        return prompt, negative, {self.library.loras.find(t.name): (t.te, t.unet) for t in [*tags, *negative_tags]}

    def use_loras(
        self,
        models: dict[str, nn.Module],
        unet_config: UNetConfig,
        loras: Mapping[str | os.PathLike, float | tuple[float, float]],
    ) -> list[Use]:
        """Merge exactly these networks into `models` (the model's parts by name): {a file path, or a name in
        library.loras: weight or (text-encoder weight, UNet weight)}. The weights they change are kept, so
        `use_loras(models, config, {})` (or another set) first puts back the model's own values, bit for bit.
        Asking for what is merged now costs nothing."""
        weights: dict[Path, tuple[float, float]] = {}
        for key, weight in loras.items():
            te, unet = weight if isinstance(weight, tuple) else (weight, weight)
            weights[self._lora_path(key)] = (float(te), float(unet))
        uses = [Use(self._placed_lora(path, models, unet_config), te, unet) for path, (te, unet) in weights.items()]
        self.merger.apply(models, uses)
        return uses

    def _lora_path(self, key: str | os.PathLike) -> Path:
        """A path as given (the caller's own file), or a bare name's file in library.loras."""
        text = os.fspath(key)
        if isinstance(key, os.PathLike) or "/" in text or "\\" in text or Path(text).suffix.lower() in LORA_SUFFIXES:
            return Path(text)
        return self.library.loras.find(text)

    def _placed_lora(self, path: Path, models: dict[str, nn.Module], unet_config: UNetConfig) -> Placed:
        """A network file read and placed in this model (the last KEEP_PLACED kept while their files are unchanged)."""
        try:
            stamp = path.stat().st_mtime_ns
        except OSError as exc:
            raise CheckpointError(path, f"cannot be read ({exc.strerror or exc}); check the LoRA's path") from None
        key = (str(path), stamp)
        placed = self.placed.pop(key, None)
        if placed is None:
            placed = place(read_lora(path), models, unet_config)
        self.placed[key] = placed  # the most recently used last; the least recently used beyond the bound go
        while len(self.placed) > KEEP_PLACED:
            del self.placed[next(iter(self.placed))]
        return placed

    def embeddings(self, conditioner: Conditioner) -> tuple[dict[str, Embedding], dict[str, str]]:
        """The embeddings in library.embeddings that `conditioner`'s model can use, by name, and those it cannot,
        with why (another family's, damaged); files are read once while unchanged."""
        usable, skipped = {}, {}
        for name, path in self.library.embeddings.files().items():
            item = self._embedding_file(path)
            problem = item if isinstance(item, str) else embedding_problem(item, conditioner.models())
            if problem is None:
                usable[name] = item
            else:
                skipped[name] = problem
        return usable, skipped

    def _embedding_file(self, path: Path) -> Embedding | str:
        """An embedding file as read, or the one line that says why it cannot be."""
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror or exc})"
        if key not in self.embedding_files:
            try:
                self.embedding_files[key] = read_embedding(path)
            except ValueError as exc:
                self.embedding_files[key] = str(exc)
        return self.embedding_files[key]

    def use_embeddings(self, conditioner: Conditioner, prompt: str, negative: str) -> list[Embedding]:
        """Give `conditioner` the library's usable embeddings (when it has an embeddings folder); return the
        conditioner's embeddings that the prompts use (for the infotext).
        A prompt naming one this model cannot use is an error saying why, not text encoded in its place."""
        if not self.library.embeddings.roots and not conditioner.embeddings:
            return []  # nothing to find (and no tokenizer needed)
        usable, skipped = self.embeddings(conditioner)
        tokenizer = conditioner.tokenizer
        unusable = embeddings_in(tokenizer, prompt, skipped) + embeddings_in(tokenizer, negative, skipped)
        if unusable:
            name = unusable[0]
            raise ValueError(f"the prompt uses embedding {name!r}, which this model cannot: {skipped[name]}")
        if self.library.embeddings.roots:  # else the conditioner keeps what the caller gave it
            conditioner.embeddings = usable
        known = conditioner.embeddings
        used = dict.fromkeys(embeddings_in(tokenizer, prompt, known) + embeddings_in(tokenizer, negative, known))
        return [known[name] for name in used]
