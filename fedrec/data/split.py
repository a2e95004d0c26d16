"""Chronological leave-one-out split (SASRec, RecBole ``LS``, the HSTU paper).

Per user, interactions sorted by time: the last item is the test target, the second-to-last
the validation target, the rest is training history. Stored as one CSR array of sorted
sequences, so 10⁵ users cost a few arrays, not 10⁵ Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedrec.data.dataset import InteractionDataset
from fedrec.data.preprocess import chronological_order

Stage = Literal["valid", "test"]


@dataclass
class SequenceSplit:
    num_users: int
    num_items: int
    offsets: np.ndarray  # [num_users + 1]
    items: np.ndarray  # all sequences, concatenated in time order
    timestamps: np.ndarray
    # Each event's rating (NaN: none given), or None when the data has no ratings.
    ratings: np.ndarray | None = None
    # Each user's attributes (name -> [num_users] of str, "" unknown): what the ranker reads of
    # the user, held like the events (on a device, only its own users').
    user_features: dict[str, np.ndarray] = field(default_factory=dict)

    def full(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return self.items[lo:hi], self.timestamps[lo:hi]

    def train_sequence(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        items, times = self.full(user)
        return items[:-2], times[:-2]

    def history(self, user: int, stage: Stage) -> tuple[np.ndarray, np.ndarray]:
        """What the model sees when predicting ``stage``'s target (test history includes validation)."""
        items, times = self.full(user)
        cut = -2 if stage == "valid" else -1
        return items[:cut], times[:cut]

    def targets(self, stage: Stage) -> np.ndarray:
        index = self.offsets[1:] - (2 if stage == "valid" else 1)
        return self.items[index]

    def history_lengths(self, stage: Stage) -> np.ndarray:
        return np.diff(self.offsets) - (2 if stage == "valid" else 1)

    def subset(self, users: np.ndarray) -> SequenceSplit:
        """The sequences of ``users`` only (renumbered ``0..len(users)-1``): a client's view."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.offsets[users + 1] - self.offsets[users]
        positions = (
            np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in users])
            if len(users)
            else np.zeros(0, dtype=np.int64)
        )
        return SequenceSplit(
            num_users=len(users),
            num_items=self.num_items,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=self.items[positions],
            timestamps=self.timestamps[positions],
            ratings=None if self.ratings is None else self.ratings[positions],
            user_features={k: v[users] for k, v in self.user_features.items()},
        )

    def recent(self, events: int, stage: Stage) -> SequenceSplit:
        """The same users and targets with each ``stage`` history cut to its last ``events``
        events (few-shot evaluation); shorter histories stay whole."""
        kept = np.minimum(np.diff(self.offsets), events + (2 if stage == "valid" else 1))
        return self._windows(self.offsets[1:] - kept, kept)

    def visible(self, stage: Stage) -> SequenceSplit:
        """Each user's ``stage`` history as a whole sequence, targets cut off: what a service
        asked for recommendations at that point sees (a request's history is one of these)."""
        return self.without_last(2 if stage == "valid" else 1)

    def without_last(self, events: int) -> SequenceSplit:
        """Each sequence without its last ``events`` events (none left for shorter ones)."""
        kept = np.maximum(np.diff(self.offsets) - events, 0)
        return self._windows(self.offsets[:-1], kept)

    def without_training_items(self, items: np.ndarray) -> SequenceSplit:
        """The same users and targets with every training event of ``items`` removed: a
        cold start, where those items are new at validation and test time. A validation
        target among them stays in the test history (it happened before the test item)."""
        keep = ~np.isin(self.items, items)
        keep[self.offsets[1:] - 1] = True
        keep[self.offsets[1:] - 2] = True
        users = np.repeat(np.arange(self.num_users), np.diff(self.offsets))
        return self._events(
            np.flatnonzero(keep), np.bincount(users[keep], minlength=self.num_users)
        )

    def _windows(self, starts: np.ndarray, kept: np.ndarray) -> SequenceSplit:
        """The same users, each with its ``kept[u]`` events from position ``starts[u]``."""
        within = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
        return self._events(np.repeat(starts, kept) + within, kept)

    def _events(self, positions: np.ndarray, lengths: np.ndarray) -> SequenceSplit:
        """The same users, user ``u`` keeping ``lengths[u]`` events: those at ``positions``
        (in order, user by user)."""
        return SequenceSplit(
            num_users=self.num_users,
            num_items=self.num_items,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=self.items[positions],
            timestamps=self.timestamps[positions],
            ratings=None if self.ratings is None else self.ratings[positions],
            user_features=self.user_features,
        )

    def train_item_counts(self) -> np.ndarray:
        in_train = np.ones(len(self.items), dtype=bool)
        in_train[self.offsets[1:] - 1] = False
        in_train[self.offsets[1:] - 2] = False
        return np.bincount(self.items[in_train], minlength=self.num_items)


def leave_one_out(ds: InteractionDataset) -> SequenceSplit:
    lengths = np.bincount(ds.user_ids, minlength=ds.num_users)
    if (lengths < 3).any():
        short = int((lengths < 3).sum())
        raise ValueError(
            f"{short} user(s) of {ds.name!r} have fewer than 3 interactions; leave-one-out needs "
            "train, validation and test items (set preprocess.min_sequence_length >= 3)"
        )
    order = chronological_order(ds)
    # Already in order: the split shares the data set's arrays (neither is written to).
    ratings = None if ds.ratings is None else np.asarray(ds.ratings, dtype=np.float64)
    return SequenceSplit(
        num_users=ds.num_users,
        num_items=ds.num_items,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=ds.item_ids if order is None else ds.item_ids[order],
        timestamps=ds.timestamps if order is None else ds.timestamps[order],
        ratings=ratings if order is None or ratings is None else ratings[order],
        user_features={
            name: np.asarray(values).astype(str).astype(object)
            for name, values in ds.user_features.items()
        },
    )
