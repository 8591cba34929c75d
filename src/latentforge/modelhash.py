"""AUTOMATIC1111's short model hash, and the cache that remembers it across processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .weightfiles import CheckpointError

PathLike = str | os.PathLike[str]

HASH_CACHE_ENV = "LATENTFORGE_CACHE_DIR"  # where model hashes are remembered (default: the user's cache folder)
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_HASH_BLOCK = 1024 * 1024


def model_hash(path: PathLike) -> str:
    """A1111's "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file's bytes.

    For a folder (the diffusers layout, which the webui cannot load and so has no hash for), the
    SHA-256 runs over its weight files (.safetensors, .ckpt, .bin, .pt, .pth, in any subfolder, hidden
    ones skipped), one after another in the sorted order of their paths relative to the folder: the
    hash of ``cat`` of those files in that order. Files are read in 1 MiB blocks.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if not files:
            fix = "give a checkpoint file or a diffusers folder"
            raise CheckpointError(root, "folder holds no weight files to hash", fix)
    elif root.exists():
        files = [root]
    else:
        raise CheckpointError(root, "no such file or folder")
    return _digest(files)[:10]


def hash_cache_file() -> Path:
    """$LATENTFORGE_CACHE_DIR/model-hashes.json, else under $XDG_CACHE_HOME/latentforge or ~/.cache/latentforge."""
    folder = os.environ.get(HASH_CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "latentforge"
    )
    return Path(folder) / "model-hashes.json"


def cached_model_hash(path: PathLike) -> str:
    """`model_hash`, remembered across processes for a single file, keyed by its absolute path, size and
    modification time (as AUTOMATIC1111's cache.json does): hashing SD 1.5 takes ~4.5 s of a 2-core CPU,
    in front of every first image. Folders are hashed each time. A cache that cannot be read or written
    is ignored."""
    return _cached(path, "model", model_hash)


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes (64 hex digits): A1111's hash of embeddings ("TI hashes", first 12)."""
    return _digest([Path(path)])


def addnet_hash(path: PathLike) -> str:
    """A1111's hash of a LoRA ("Lora hashes", first 12 digits): the SHA-256 of a safetensors file's tensor
    bytes, after its header (so editing the metadata keeps it); of the whole file for other formats."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
            if path.suffix.lower() != ".safetensors" or len(head) < 8:
                return _digest([path])
            stream.seek(8 + int.from_bytes(head, "little"))
            digest = hashlib.sha256()
            for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
                digest.update(block)
            return digest.hexdigest()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file to hash it ({exc.strerror or exc})") from exc


def cached_hash(path: PathLike, kind: str) -> str:
    """`file_sha256` ("sha256") or `addnet_hash` ("addnet") of a file, remembered as `cached_model_hash` is."""
    return _cached(path, kind, {"sha256": file_sha256, "addnet": addnet_hash}[kind])


def _digest(files: list[Path]) -> str:
    """The SHA-256 (hex) of the files' bytes, one after another, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as stream:
                for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
                    digest.update(block)
        except OSError as exc:
            raise CheckpointError(file, f"cannot read file to hash it ({exc.strerror or exc})") from exc
    return digest.hexdigest()


def _cached(path: PathLike, kind: str, function) -> str:
    """function(path), remembered under (kind, absolute path) with the file's size and modification time."""
    file = Path(path).resolve()
    if not file.is_file():
        return function(file)
    stat = file.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    store = hash_cache_file()
    try:
        cache = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    key = str(file) if kind == "model" else f"{kind}:{file}"
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("hash"), str):
        return entry["hash"]
    cache[key] = {"stamp": stamp, "hash": function(file)}
    temp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(temp, store)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
    return cache[key]["hash"]


__all__ = [
    "HASH_CACHE_ENV", "addnet_hash", "cached_hash", "cached_model_hash", "file_sha256", "hash_cache_file", "model_hash",
]  # fmt: skip
