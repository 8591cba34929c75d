"""AUTOMATIC1111's prompt styles: a `styles.csv` of named prompt / negative-prompt pieces, added to a request's
prompts by name.

The file has a header row with `name`, `prompt` and `negative_prompt` columns (others, such as A1111's newer
`description`, are read and ignored), one style per row. A style's text holding `{prompt}` has the user's
prompt put in its place; otherwise it is appended after a comma (A1111's rule); styles apply in the order
they are named.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FileError

PathLike = str | os.PathLike
MAX_STYLES_BYTES = 4 * 1024 * 1024  # a styles file is hand-written text: a few KB; refuse anything huge


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: PathLike) -> dict[str, Style]:
    """The styles of a styles.csv by name (the last row of a name wins, as A1111's dict does)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STYLES_BYTES:
            raise FileError(path, f"is over {MAX_STYLES_BYTES // 2**20} MB; a styles file is a small CSV", "check the path")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileError(path, "no such file", "give the path of a styles.csv (name,prompt,negative_prompt)") from None
    except UnicodeDecodeError:
        raise FileError(path, "is not UTF-8 text", "save it as a UTF-8 CSV") from None
    except OSError as exc:
        raise FileError(path, f"cannot be read ({exc.strerror or exc})", "check its permissions") from None
    rows = csv.DictReader(text.splitlines())
    if rows.fieldnames is None or "name" not in rows.fieldnames:
        raise FileError(path, "has no header row with a 'name' column", "start it with: name,prompt,negative_prompt")
    styles = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def merge(prompt: str, style: str) -> str:
    """A style's text with the prompt in its `{prompt}`, or appended to the prompt after ", "."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(prompt: str, negative: str, styles: dict[str, Style], names: list[str]) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order; an unknown name is an error."""
    for name in names:
        style = styles.get(name)
        if style is None:
            known = ", ".join(sorted(styles)[:10]) or "none (no styles file)"
            raise ValueError(f"unknown style {name!r}; known: {known}")
        prompt, negative = merge(prompt, style.prompt), merge(negative, style.negative_prompt)
    return prompt, negative
