"""Who a model may have trained on: held-out users and planted canaries for privacy audits.

A membership-inference audit needs non-members drawn from the same distribution as members:
``holdout_fraction`` of the users (a public, seeded draw) get no client and are never trained
on. ``canaries`` members have their training history replaced by a uniformly random item
sequence, the secret whose exposure (Carlini et al. 2019) the audit measures; their held-out
items stay real, so they add a little noise to the run's accuracy figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedrec.data.split import SequenceSplit


@dataclass
class MembershipConfig:
    holdout_fraction: float = 0.0
    canaries: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("privacy_audit.holdout_fraction must lie in [0, 1)")
        if self.canaries < 0:
            raise ValueError("privacy_audit.canaries must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.holdout_fraction > 0 or self.canaries > 0


def held_out(num_users: int, config: MembershipConfig, seed: int) -> np.ndarray:
    """A boolean mask of the users never trained on."""
    return np.random.default_rng([seed, 0xA0D17]).random(num_users) < config.holdout_fraction


def canary_users(num_users: int, config: MembershipConfig, seed: int) -> np.ndarray:
    """The members whose training history is a planted canary."""
    members = np.flatnonzero(~held_out(num_users, config, seed))
    rng = np.random.default_rng([seed, 0xCA9A])
    return np.sort(rng.choice(members, size=min(config.canaries, len(members)), replace=False))


def random_sequences(
    split: SequenceSplit, user: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` uniformly random item sequences as long as ``user``'s training history."""
    length = int(split.offsets[user + 1] - split.offsets[user]) - 2
    return rng.integers(0, split.num_items, size=(count, length))


def plant_canaries(split: SequenceSplit, config: MembershipConfig, seed: int) -> SequenceSplit:
    """``split`` with each canary user's training history replaced by its canary."""
    if config.canaries == 0:
        return split
    items = split.items.copy()
    ratings = None if split.ratings is None else split.ratings.copy()
    for user in canary_users(split.num_users, config, seed):
        start = int(split.offsets[user])
        canary = random_sequences(split, int(user), 1, np.random.default_rng([seed, int(user)]))
        items[start : start + canary.shape[1]] = canary[0]
        if ratings is not None:  # a canary is a sequence of items, never rated
            ratings[start : start + canary.shape[1]] = np.nan
    return replace(split, items=items, ratings=ratings)
