"""Writes that never leave a half-written file: a temp file beside the target, fsynced, renamed over it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, else delete it."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, target)
    except BaseException:  # also on Ctrl-C: never leave a half-written temp file behind
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_folder(target.parent)


def fsync_file(path: Path) -> None:
    """Force a file's bytes to disk so the rename never exposes an empty or partial file."""
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX only: Windows cannot open folders for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj: object, path: PathLike) -> None:
    """Atomically write obj as indented UTF-8 JSON (e.g. a config.json)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # serialise first: a bad obj leaves no file
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
