"""Download MovieLens archives from GroupLens into a cache, verified by SHA-256."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedrec.errors import FedrecDataError


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str
    folder: str  # the folder the zip unpacks to


# Digests as published in TensorFlow Datasets' url_checksums/movielens.txt.
ARCHIVES = {
    "ml-100k": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        "ml-100k",
    ),
    "ml-1m": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "ml-1m",
    ),
}

DEFAULT_CACHE = Path.home() / ".cache" / "fedrec"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_movielens(
    name: str, cache_dir: str | Path = DEFAULT_CACHE, timeout: float = 30.0
) -> Path:
    """Return the folder of the unpacked GroupLens archive ``name``, downloading it if needed.

    The archive is verified against its published SHA-256 before it is unpacked; a mismatch
    deletes it and raises. Offline, this fails at once and says how to point at local files.
    """
    if name not in ARCHIVES:
        raise FedrecDataError(
            f"unknown MovieLens archive {name!r}; choose one of {sorted(ARCHIVES)}"
        )
    archive = ARCHIVES[name]
    cache = Path(cache_dir)
    target = cache / archive.folder
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    zip_path = cache / f"{name}.zip"
    if not zip_path.is_file():
        partial = zip_path.with_suffix(".zip.part")
        try:
            with (
                urllib.request.urlopen(archive.url, timeout=timeout) as response,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            partial.unlink(missing_ok=True)
            raise FedrecDataError(
                f"cannot download {archive.url} ({err}). This machine may be offline: download "
                f"and unpack the archive elsewhere and pass its folder with --data-dir"
            ) from None
        partial.rename(zip_path)
    actual = sha256_of(zip_path)
    if actual != archive.sha256:
        zip_path.unlink()
        raise FedrecDataError(
            f"SHA-256 mismatch: expected {archive.sha256}, got {actual}; the file was deleted",
            zip_path,
        )
    staging = cache / f".{archive.folder}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as bundle:
        bundle.extractall(staging)
    (staging / archive.folder).rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target
