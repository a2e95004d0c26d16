"""Filtering applied between loading and splitting, all driven by ``PreprocessConfig``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedrec.data.dataset import InteractionDataset

log = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """What to filter before the chronological split.

    ``rating_threshold``: keep interactions rated at least this much (implicit feedback).
    ``drop_duplicates``: keep only the earliest interaction of each (user, item) pair.
    ``k_core``: iteratively drop users and items with fewer than ``k`` interactions (0: off).
    ``min_sequence_length``: drop users with fewer interactions (leave-one-out needs >= 3).
    """

    rating_threshold: float | None = None
    drop_duplicates: bool = True
    k_core: int = 0
    min_sequence_length: int = 5

    def __post_init__(self) -> None:
        if self.k_core < 0:
            raise ValueError(f"preprocess.k_core must be >= 0, got {self.k_core}")
        if self.min_sequence_length < 3:
            raise ValueError(
                f"preprocess.min_sequence_length must be >= 3 (train, validation and test items), "
                f"got {self.min_sequence_length}"
            )


def chronological_order(ds: InteractionDataset) -> np.ndarray:
    """Indices sorting interactions by user, then time; ties keep file order (as RecBole does)."""
    return np.lexsort((np.arange(ds.num_interactions), ds.timestamps, ds.user_ids))


def preprocess(ds: InteractionDataset, config: PreprocessConfig) -> InteractionDataset:
    keep = np.ones(ds.num_interactions, dtype=bool)
    if config.rating_threshold is not None:
        if ds.ratings is None:
            raise ValueError(
                f"preprocess.rating_threshold is set but data set {ds.name!r} has no ratings"
            )
        keep &= ds.ratings >= config.rating_threshold
    if config.drop_duplicates:
        order = chronological_order(ds)
        order = order[keep[order]]
        pair = ds.user_ids[order] * ds.num_items + ds.item_ids[order]
        _, first = np.unique(pair, return_index=True)
        keep = np.zeros_like(keep)
        keep[order[first]] = True
    users, items = ds.user_ids, ds.item_ids
    while True:
        user_counts = np.bincount(users[keep], minlength=ds.num_users)
        item_counts = np.bincount(items[keep], minlength=ds.num_items)
        drop = user_counts[users] < max(config.k_core, config.min_sequence_length)
        if config.k_core:
            drop |= item_counts[items] < config.k_core
        drop &= keep
        if not drop.any():
            break
        keep &= ~drop
        if not config.k_core:
            break
    if not keep.any():
        raise ValueError(
            f"preprocessing removed every interaction of {ds.name!r}; relax the preprocess options"
        )
    result = ds.subset(keep)
    log.info("preprocessed %s: %s", ds.name, result.summary())
    return result
