"""Data layer: loaders, synthetic generator, preprocessing and the leave-one-out split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedrec.data.dataset import InteractionDataset
from fedrec.data.download import DEFAULT_CACHE, download_movielens
from fedrec.data.loaders import LOADERS
from fedrec.data.preprocess import PreprocessConfig, preprocess
from fedrec.data.split import SequenceSplit, leave_one_out
from fedrec.data.synthetic import SyntheticConfig, generate_synthetic
from fedrec.errors import FedrecDataError

_DOWNLOADABLE = {"movielens-100k": "ml-100k", "movielens-1m": "ml-1m"}


@dataclass
class DataConfig:
    """Where interactions come from and how they are filtered.

    ``source``: one of ``synthetic``, ``recbole``, ``movielens-100k``, ``movielens-1m``,
    ``sequences``. ``path``: folder (or file, for ``sequences``) to read; ``--data-dir``
    overrides it. ``download``: fetch MovieLens from GroupLens into ``cache_dir`` when no
    path is given (checksummed; never a silent substitute).
    """

    source: str = "synthetic"
    path: str | None = None
    name: str | None = None
    encoding: str | None = None
    download: bool = False
    cache_dir: str = str(DEFAULT_CACHE)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(
                f"data.source must be one of {list(DATA_SOURCES)}, got {self.source!r}"
            )
        if self.download and self.source not in _DOWNLOADABLE:
            raise ValueError(
                f"data.download works only for {sorted(_DOWNLOADABLE)}, not {self.source!r}"
            )


def _synthetic(config: DataConfig) -> InteractionDataset:
    folder = config.synthetic.catalogue
    if not folder:
        return generate_synthetic(config.synthetic)
    if not Path(folder).is_dir():
        raise FedrecDataError(
            "synthetic.catalogue: no such folder (a RecBole data set, e.g. ../shared/data/ml-100k)",
            folder,
        )
    return generate_synthetic(config.synthetic, LOADERS["recbole"](folder))


def _files(config: DataConfig) -> InteractionDataset:
    """A file loader of ``LOADERS`` on ``data.path`` (or the checksummed download)."""
    path = config.path
    if path is None:
        if config.download:
            path = str(download_movielens(_DOWNLOADABLE[config.source], config.cache_dir))
        else:
            raise FedrecDataError(
                f"data.source {config.source!r} needs a location: pass --data-dir (or set data.path"
                + (", or data.download: true" if config.source in _DOWNLOADABLE else "")
                + ")"
            )
    if not Path(path).exists():
        raise FedrecDataError("does not exist; check --data-dir / data.path", path)
    kwargs: dict[str, str] = {}
    if config.encoding:
        kwargs["encoding"] = config.encoding
    if config.source == "recbole" and config.name:
        kwargs["name"] = config.name
    return LOADERS[config.source](path, **kwargs)


# Data sources by name (``data.source``): the generator, and every file loader. A new file
# format is one loader registered in ``fedrec.data.loaders.LOADERS``.
DATA_SOURCES: dict[str, Callable[[DataConfig], InteractionDataset]] = {
    "synthetic": _synthetic,
    **dict.fromkeys(LOADERS, _files),
}


def load_dataset(config: DataConfig) -> InteractionDataset:
    """Load (or generate) the raw data set named by ``config``, before preprocessing."""
    return DATA_SOURCES[config.source](config)


def prepare_split(config: DataConfig) -> tuple[InteractionDataset, SequenceSplit]:
    """Load, preprocess and split: the data path every trainer and simulation shares."""
    dataset = preprocess(load_dataset(config), config.preprocess)
    return dataset, leave_one_out(dataset)


__all__ = [
    "DataConfig",
    "InteractionDataset",
    "PreprocessConfig",
    "SequenceSplit",
    "SyntheticConfig",
    "generate_synthetic",
    "leave_one_out",
    "load_dataset",
    "prepare_split",
    "preprocess",
]
