"""PNG files: written atomically under AUTOMATIC1111's names, with the infotext in a text chunk; the text read back.

PNGs are written under A1111's names (``00000-<seed>.png``, the next number in the folder), first to
a temporary file in that folder and then hard-linked to a name nobody holds yet: two processes never
take the same name, nothing is ever overwritten, and an interrupted run leaves no partial PNG.
`read_infotext` reads only the chunk headers and the text chunks: the pixels are never decoded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image, PngImagePlugin

from .atomic import fsync_file, fsync_folder
from .images import PNG_SIGNATURE, ImageError, check_file
from .infotext import GenerationInfo, format_infotext, parse_infotext

PathLike = str | os.PathLike[str]

PNG_TEXT_KEY = "parameters"  # the webui's PNG text key for the infotext
_MAX_TEXT_BYTES = PngImagePlugin.MAX_TEXT_CHUNK  # Pillow's own cap on one (decompressed) text chunk
# A1111's sanitize_filename_part: characters that no file name may hold on any common system.
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


def check_output_folder(path: PathLike) -> Path:
    """Make sure images can be written to `path` (created if missing); call it before any work.

    Raises ImageError (a ValueError) naming the path when it is a file, lies under a file, cannot be
    created, or does not accept a new file (checked by creating and removing one).
    """
    folder = Path(path)
    fix = "choose another output folder"
    if folder.exists() and not folder.is_dir():
        raise ImageError(folder, "is a file, not a folder", f"{fix}, or move the file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ImageError(folder, "cannot create the folder: a file is in the way on its path", fix) from exc
    except OSError as exc:
        raise ImageError(folder, f"cannot create the folder ({exc.strerror or exc})", fix) from exc
    try:
        probe = _create_temp(folder, ".write-test")
        probe.unlink()
    except OSError as exc:
        cause = f"folder is not writable ({exc.strerror or exc})"
        raise ImageError(folder, cause, f"{fix} or fix its permissions") from exc
    return folder


def save_png(
    image: Image.Image,
    folder: PathLike,
    info: GenerationInfo | None = None,
    stem: str | None = None,
    *,
    parameters: str | None = None,
) -> Path:
    """Write `image` as ``<folder>/NNNNN-<stem>.png`` with its infotext; return the path written.

    The infotext (PNG text chunk "parameters", tEXt, or iTXt when it is not Latin-1) is
    format_infotext(info), else `parameters`, else the image's own info["parameters"] (which
    Pipeline.generate sets). `stem` defaults to the seed (from `info`, else from the infotext), as the
    webui's default "[seed]" file pattern; with neither the name is just ``NNNNN.png``. NNNNN is
    one more than the highest number any file in the folder starts with (the webui's rule), and the
    next one again if another writer takes that name first: no file is ever overwritten.
    """
    folder = Path(folder)
    if info is not None:
        parameters = format_infotext(info)
    elif parameters is None:
        parameters = image.info.get(PNG_TEXT_KEY)
    if stem is None:
        seed = info.seed if info is not None else parse_infotext(parameters).get("Seed") if parameters else None
        stem = "" if seed is None else str(seed)
    suffix = f"-{_safe_stem(folder, stem)}.png" if stem else ".png"
    pnginfo = PngImagePlugin.PngInfo()
    if parameters is not None:
        pnginfo.add_text(PNG_TEXT_KEY, parameters)  # Pillow falls back to iTXt when not Latin-1
    try:
        temp = _create_temp(folder, ".png.tmp")
    except OSError as exc:
        cause = f"cannot write an image here ({exc.strerror or exc})"
        raise ImageError(folder, cause, "check the output folder") from exc
    try:
        try:
            with open(temp, "wb") as file:
                image.save(file, format="PNG", pnginfo=pnginfo)
            fsync_file(temp)
            target = _link_unique(temp, folder, suffix)
        except OSError as exc:
            cause = f"cannot write the PNG ({exc.strerror or exc})"
            raise ImageError(folder, cause, "check free space and permissions") from exc
    finally:  # also on Ctrl-C: the temp file never outlives the call
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    fsync_folder(folder)
    return target


def _safe_stem(folder: Path, stem: str) -> str:
    """A file-name part: characters no system allows become "_" (as the webui does); never a path."""
    cleaned = _BAD_NAME_CHARS.sub("_", stem).strip().rstrip(".")[:128]
    if not cleaned:
        raise ImageError(folder, f"unusable file name part {stem!r}", "give a stem with letters or digits")
    return cleaned


def _create_temp(folder: Path, suffix: str) -> Path:
    """A new, empty, hidden file in `folder`, created exclusively, with the usual permissions (umask)."""
    while True:
        path = folder / f".latentforge-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def next_sequence_number(folder: PathLike) -> int:
    """The webui's get_next_sequence_number: 1 + the largest number a file name starts with, else 0.

    A name counts when the part before its first "-" (extension removed) is a number:
    "00007-1234.png" and "00007.png" count as 7, "grid-0001.png" does not count.
    """
    highest = -1
    for name in os.listdir(folder):
        head = os.path.splitext(name)[0].split("-")[0]
        if head.isascii() and head.isdigit():
            highest = max(highest, int(head))
    return highest + 1


def _link_unique(temp: Path, folder: Path, suffix: str) -> Path:
    """Give the finished temp file the next free NNNNN name; a name taken meanwhile is skipped."""
    number = next_sequence_number(folder)
    for _ in range(100_000):
        target = folder / f"{number:05}{suffix}"
        try:
            os.link(temp, target)  # fails if the name exists: atomic, and never overwrites
            return target
        except FileExistsError:
            number += 1
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV):
                raise
            # no hard links here (FAT, some network shares): reserve the name, then replace it
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                number += 1
                continue
            os.replace(temp, target)
            return target
    raise ImageError(folder, "no free file name found", "choose another output folder")


def read_infotext(path: PathLike) -> str | None:
    """The "parameters" text of a PNG (tEXt, zTXt or iTXt, anywhere in the file), else None.

    Only the chunk headers are read: the pixels are never decoded, so a huge image is no problem.
    Not a PNG, or a PNG without that text: None. A missing or empty file, or one cut short before
    the text: ImageError (a PNG cut short after it, e.g. an interrupted copy, still gives the text).
    """
    check_file(path)
    found = None
    try:
        with open(path, "rb") as file:
            if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return None
            for kind, data in _png_chunks(path, file, {b"tEXt", b"zTXt", b"iTXt"}):
                text = _png_text(kind, data, PNG_TEXT_KEY)
                if text is not None:
                    found = text  # the last one wins, as in Pillow's image.info
    except ImageError:
        if found is None:
            raise
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return found


def _png_chunks(path: PathLike, file: IO[bytes], wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of the wanted chunks, seeking over all others, up to IEND."""
    while True:
        head = file.read(8)
        if len(head) < 8:
            raise ImageError(path, "PNG is cut short (no IEND chunk)", "the file is damaged")
        length, kind = struct.unpack(">I4s", head)
        if kind in wanted and length <= _MAX_TEXT_BYTES:
            data = file.read(length)
            if len(data) < length:
                cause = f"PNG is cut short (in its {kind.decode('latin-1')} chunk)"
                raise ImageError(path, cause, "the file is damaged")
            yield kind, data
        else:
            file.seek(length, os.SEEK_CUR)
        file.seek(4, os.SEEK_CUR)  # CRC
        if kind == b"IEND":
            return


def _png_text(kind: bytes, data: bytes, key: str) -> str | None:
    """The text of a tEXt/zTXt/iTXt chunk whose keyword is `key`, else None (also when malformed)."""
    keyword, _, rest = data.partition(b"\0")
    if keyword != key.encode("latin-1"):
        return None
    try:
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(rest[1:]).decode("latin-1")
        compressed, _method, rest = rest[0], rest[1], rest[2:]
        _lang, _, rest = rest.partition(b"\0")
        _translated, _, rest = rest.partition(b"\0")
        return (_inflate(rest) if compressed else rest).decode("utf-8")
    except (IndexError, ValueError, zlib.error):
        return None


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most Pillow's text-chunk cap (a zip bomb in a text chunk is refused)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


__all__ = ["PNG_TEXT_KEY", "check_output_folder", "next_sequence_number", "read_infotext", "save_png"]
