"""Error types shared across fedrec."""

from __future__ import annotations

from pathlib import Path


class FedrecDataError(ValueError):
    """Raised for unreadable or malformed data; names the file and line when known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


class FedrecConfigError(ValueError):
    """Raised for invalid configuration; names the option (and file) to fix."""
