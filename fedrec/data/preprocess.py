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


def chronological_order(ds: InteractionDataset) -> np.ndarray | None:
    """Indices sorting interactions by user, then time; ties keep file order (as RecBole does).
    None when they are in that order already (the synthetic generator writes them so): at 10^7
    events the sort's keys and result cost gigabytes a no-op need not."""
    if in_chronological_order(ds.user_ids, ds.timestamps):
        return None
    return np.lexsort((np.arange(ds.num_interactions), ds.timestamps, ds.user_ids))


def in_chronological_order(users: np.ndarray, timestamps: np.ndarray) -> bool:
    """Whether events are sorted by user, then time (chunk by chunk: no event-sized temporaries)."""
    chunk = 1 << 20
    for lo in range(0, max(len(users) - 1, 0), chunk):
        u, t = users[lo : lo + chunk + 1], timestamps[lo : lo + chunk + 1]
        step = np.diff(u)
        if (step < 0).any() or ((step == 0) & (np.diff(t) < 0)).any():
            return False
    return True


def _earliest_of_each_pair(ds: InteractionDataset, keep: np.ndarray) -> np.ndarray:
    """Of the interactions ``keep`` marks, the earliest of each (user, item) pair. A pair never
    spans two users, so the events are taken in chronological order a block of whole users at
    a time: the sort's temporaries stay block-sized, not event-sized."""
    order = chronological_order(ds)
    positions = np.flatnonzero(keep) if order is None else order[keep[order]]
    earliest = np.zeros_like(keep)
    lo = 0
    while lo < len(positions):
        hi, size = len(positions), _DEDUPE_BLOCK
        while lo + size < len(positions):  # end the block where a user ends
            users = ds.user_ids[positions[lo : lo + size]]
            changes = np.flatnonzero(users[1:] != users[:-1])
            if len(changes):
                hi = lo + int(changes[-1]) + 1
                break
            size *= 2
        block = positions[lo:hi]
        pair = ds.user_ids[block] * ds.num_items + ds.item_ids[block]
        _, first = np.unique(pair, return_index=True)  # stable: the earliest of equal pairs
        earliest[block[first]] = True
        lo = hi
    return earliest


_DEDUPE_BLOCK = 1 << 20


def preprocess(ds: InteractionDataset, config: PreprocessConfig) -> InteractionDataset:
    keep = np.ones(ds.num_interactions, dtype=bool)
    if config.rating_threshold is not None:
        if ds.ratings is None:
            raise ValueError(
                f"preprocess.rating_threshold is set but data set {ds.name!r} has no ratings"
            )
        keep &= ds.ratings >= config.rating_threshold
    if config.drop_duplicates:
        keep = _earliest_of_each_pair(ds, keep)
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
