"""Line-oriented reading of delimited text files with file:line error reporting.

Written by hand rather than with ``np.loadtxt``/``csv`` because every malformed row must be
reported with its file and line number, and nothing half-parsed may escape.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator
from pathlib import Path

from fedrec.errors import FedrecDataError

_SEPARATOR_NAMES = {
    "\t": "tab",
    ",": "comma",
    ";": "semicolon",
    "|": "pipe",
    "::": "'::'",
    " ": "space",
}


def separator_name(sep: str | None) -> str:
    if sep is None:
        return "whitespace"
    return _SEPARATOR_NAMES.get(sep, repr(sep))


def read_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for non-empty lines, decoding each line on its own.

    A decoding failure names the line and suggests the ``encoding`` option.
    """
    if not path.is_file():
        raise FedrecDataError("file not found", path)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise FedrecDataError(
            f"unknown encoding {encoding!r}; set the data `encoding` option (e.g. utf-8, latin-1)",
            path,
            1,
        ) from None
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise FedrecDataError(
                    f"cannot decode bytes {raw[err.start : err.end]!r} as {encoding}; "
                    "set the data `encoding` option (MovieLens-1M files are latin-1)",
                    path,
                    number,
                ) from None
            text = text.rstrip("\r\n")
            if text.strip():
                yield number, text


def split_fields(text: str, sep: str | None, expected: int, path: Path, line: int) -> list[str]:
    """Split one line into exactly ``expected`` fields or raise with a precise message."""
    fields = text.split(sep) if sep is not None else text.split()
    if len(fields) == expected:
        return fields
    hint = ""
    if len(fields) == 1:
        others = [
            name for s, name in _SEPARATOR_NAMES.items() if s != sep and s != " " and s in text
        ]
        if others:
            hint = f" (the line contains {others[0]}s: wrong separator? expected {separator_name(sep)})"
    what = "truncated line" if len(fields) < expected else "too many fields"
    raise FedrecDataError(
        f"{what}: expected {expected} {separator_name(sep)}-separated fields, found {len(fields)}{hint}",
        path,
        line,
    )


def parse_int(value: str, column: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise FedrecDataError(
            f"column {column!r}: {value!r} is not an integer", path, line
        ) from None


def parse_float(value: str, column: str, path: Path, line: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FedrecDataError(f"column {column!r}: {value!r} is not a number", path, line) from None
    if not math.isfinite(number):  # a NaN timestamp would sort last and become a test item
        raise FedrecDataError(f"column {column!r}: {value!r} is not a finite number", path, line)
    return number
