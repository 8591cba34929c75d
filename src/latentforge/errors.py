"""The project's errors about files: one line naming the file, the cause and, where there is one, the fix."""

from __future__ import annotations

import os


def one_line(text: object) -> str:
    """Collapse any text (e.g. a multi-line library error) onto one line."""
    return " ".join(str(text).split())


class FileError(ValueError):
    """A file or folder that cannot be used; str() is one line: 'path: cause; fix'."""

    def __init__(self, path: str | os.PathLike[str], cause: str, fix: str | None = None) -> None:
        self.path = os.fspath(path)
        self.cause = one_line(cause)
        self.fix = one_line(fix) if fix else None
        message = f"{self.path}: {self.cause}"
        super().__init__(f"{message}; {self.fix}" if self.fix else message)


class GenerationError(ValueError):
    """A generation that cannot give a usable image (its latents or pixels became NaN/inf); says why."""
