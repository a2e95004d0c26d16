"""Checkpoint files: written atomically, read without pickle.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a crafted
checkpoint cannot run code; what fedrec saves in one is kept to those types (numpy arrays are
stored as tensors).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fedrec.errors import FedrecDataError


def save_atomic(obj: object, path: Path) -> None:
    """Write with ``torch.save`` to a temporary file and rename, so a crash never leaves half a
    file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Any:
    """A checkpoint's content, with tensors on the CPU; anything but tensors and plain
    containers (a pickled object, a truncated or foreign file) is refused in one line that
    names the file."""
    path = Path(path)
    if not path.is_file():
        raise FedrecDataError("no such checkpoint", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise FedrecDataError(
            f"not a checkpoint fedrec can load safely ({reason}); it is corrupt, truncated or "
            "holds more than tensors and plain values: restore it from a backup or start a new "
            "run folder",
            path,
        ) from None
