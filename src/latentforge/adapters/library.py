"""Folders of add-ons (LoRA, embeddings, VAE files), looked up by name, and the prompt tags that name them.

A prompt names a LoRA as AUTOMATIC1111 does: `<lora:NAME:W>` (W for the text encoders and the UNet),
`<lora:NAME:TE:UNET>`, or with named values `<lora:NAME:te=0.5:unet=1>`; `<lyco:...>` (the older LyCORIS
extension's tag) is the same. NAME is a file's stem in one of the LoRA folders (subfolders included), never
a path: a request cannot make the server read a file outside them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors

PathLike = str | os.PathLike

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# A1111's extra-network tag: <kind:arguments>
TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` of a prompt: the file's name and the multipliers (text encoders, UNet)."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def split_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags (what is encoded), and the tags in order. Another kind of
    tag (e.g. `<hypernet:...>`) is an error: latentforge has no such network."""
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind not in LORA_KINDS:
            raise ValueError(f"the prompt's <{kind}:...> names a kind of network latentforge has not got; use <lora:NAME:WEIGHT>")
        tags.append(_lora_tag(arguments, match.group(0)))
        return ""

    return TAG.sub(take, prompt), tags


def _lora_tag(arguments: str, tag: str) -> LoraTag:
    """`NAME[:TE[:UNET]]`, any value also as `te=` / `unet=`; UNET defaults to TE, TE to 1."""
    parts = [part.strip() for part in arguments.split(":")]
    name, positional, named = parts[0], [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            named[key.strip()] = value.strip()
        else:
            positional.append(part)
    unknown = set(named) - {"te", "unet"}
    if not name or len(positional) > 2 or unknown:
        raise ValueError(f"{tag} is not a LoRA tag; write <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    values = dict(zip(("te", "unet"), positional, strict=False)) | named
    te = _multiplier(values.get("te", "1"), tag)
    unet = _multiplier(values["unet"], tag) if "unet" in values else te
    return LoraTag(name, te, unet)


def _multiplier(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: {text!r} is not a number; write a weight such as 0.8") from None
    if not -100 <= value <= 100:  # also refuses nan and inf
        raise ValueError(f"{tag}: weight {text} is out of range; use a weight between -100 and 100")
    return value


def check_name(name: str, what: str) -> str:
    """A name from a prompt or a request: a file's stem, never a path (no separators, no '..')."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.sep in name:
        raise ValueError(f"{what} {name!r} is not a name: give the file's name without folders (see the list of {what}s)")
    return name


@dataclass
class Folder:
    """Files of one kind under some folders, by stem; scanned on first use and by `refresh`."""

    roots: tuple[Path, ...] = ()
    suffixes: tuple[str, ...] = LORA_SUFFIXES
    what: str = "LoRA"
    _files: dict[str, Path] | None = field(default=None, repr=False)

    def refresh(self) -> dict[str, Path]:
        """Scan the folders again (subfolders too, hidden ones skipped); the first file of a name wins."""
        files: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
                if path.suffix.lower() in self.suffixes and path.is_file() and not hidden:
                    files.setdefault(path.stem, path)
        self._files = files
        return files

    def files(self) -> dict[str, Path]:
        """name -> file."""
        return self._files if self._files is not None else self.refresh()

    def find(self, name: str) -> Path:
        """The file of a name (its stem, or its file name as A1111's VAE list gives it), looked up again after
        a rescan if new; one line when there is none."""
        check_name(name, self.what)
        stem = Path(name).stem if Path(name).suffix.lower() in self.suffixes else name
        path = self.files().get(stem) or self.refresh().get(stem)
        if path is not None and stem != name and path.name != name:
            path = None  # "x.pt" names x.pt, not x.safetensors
        if path is None:
            where = ", ".join(str(root) for root in self.roots) or "no folder (give one)"
            known = ", ".join(sorted(self.files())[:8]) or "none"
            raise ValueError(f"no {self.what} named {name!r} in {where}; known: {known}")
        return path


@dataclass
class Library:
    """The add-on folders of a pipeline or a server."""

    loras: Folder = field(default_factory=Folder)
    embeddings: Folder = field(default_factory=lambda: Folder(suffixes=EMBEDDING_SUFFIXES, what="embedding"))
    vaes: Folder = field(default_factory=lambda: Folder(suffixes=VAE_SUFFIXES, what="VAE"))

    @classmethod
    def from_dirs(
        cls, lora_dirs: list[PathLike] = (), embedding_dirs: list[PathLike] = (), vae_dirs: list[PathLike] = ()
    ) -> Library:
        def roots(dirs: list[PathLike]) -> tuple[Path, ...]:
            return tuple(Path(d) for d in dirs)

        return cls(
            Folder(roots(lora_dirs)),
            Folder(roots(embedding_dirs), EMBEDDING_SUFFIXES, "embedding"),
            Folder(roots(vae_dirs), VAE_SUFFIXES, "VAE"),
        )


def lora_listing(folder: Folder) -> list[dict[str, object]]:
    """A1111's /sdapi/v1/loras entries: name, alias, path and the file's metadata (safetensors' header; the
    ss_* fields kohya's trainers write), {} where there is none or it cannot be read."""
    return [{"name": name, "alias": name, "path": str(path), "metadata": file_metadata(path)} for name, path in folder.files().items()]


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, read from its header only; {} for other formats or unreadable files."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safetensors.safe_open(path, "pt") as file:
            return dict(file.metadata() or {})
    except (OSError, safetensors.SafetensorError):
        return {}


def describe_addon(path: PathLike) -> str | None:
    """One line saying which add-on a file is (a LoRA and its kinds and parts, an embedding and its vectors,
    a VAE), or None if it is none of them (a file with a UNet is a checkpoint, however damaged)."""
    from ..checkpoints import UNET_PREFIX
    from ..weightfiles import CheckpointError, read_state_dict

    try:
        if any(key.startswith(UNET_PREFIX) for key in read_state_dict(path)[0]):
            return None
    except CheckpointError:
        return None
    from .embeddings import read_embedding
    from .lora import effective_rank, read_lora
    from .names import split_part
    from .vae_file import read_vae

    try:
        lora = read_lora(path)
    except CheckpointError:
        pass
    else:
        kinds: dict[str, int] = {}
        for module in lora.modules.values():
            kinds[module.kind] = kinds.get(module.kind, 0) + 1
        parts = sorted({split[0] for key in lora.modules if (split := split_part(key)) is not None})
        rank = effective_rank(lora)
        described = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        base = lora.metadata.get("ss_base_model_version")
        return (
            f"a LoRA / LyCORIS network: {len(lora.modules)} modules ({described})"
            + (f", rank up to {rank}" if rank else "") + f", parts: {', '.join(parts)}"
            + (f", trained on {base}" if base else "")
        )
    try:
        embedding = read_embedding(path)
    except CheckpointError:
        pass
    else:
        shapes = ", ".join(f"{part} {tuple(v.shape)}" for part, v in embedding.vectors.items())
        return f"a textual-inversion embedding '{embedding.name}': {shapes}"
    try:
        config, tensors = read_vae(path)
    except CheckpointError:
        return None
    count = sum(t.numel() for t in tensors.values())
    return f"a VAE: {config.latent_channels} latent channels, {count / 1e6:.1f}M parameters"
