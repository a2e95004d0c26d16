"""Who holds which users: the partition of a population into federated clients.

``user`` (cross-device, the default): one client per user. ``hash``: ``num_partitions`` silos
by a stable hash of the raw user id. ``attribute``: one silo per value of a user attribute
(e.g. occupation). Partitions are computed from ids alone, so every process derives the same
assignment without exchanging data. A new scheme is one function registered in
``PARTITIONERS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from fedrec.data.dataset import InteractionDataset

Partitioner = Callable[[InteractionDataset, int, str], list[np.ndarray]]


def _one_per_user(
    dataset: InteractionDataset, num_partitions: int, attribute: str
) -> list[np.ndarray]:
    return [np.array([u]) for u in range(dataset.num_users)]


def _by_hash(dataset: InteractionDataset, num_partitions: int, attribute: str) -> list[np.ndarray]:
    if num_partitions < 1:
        raise ValueError("federated.num_partitions must be >= 1 for hash partitioning")
    buckets = np.array(
        [
            int.from_bytes(hashlib.sha256(str(raw).encode()).digest()[:8], "big") % num_partitions
            for raw in dataset.raw_user_ids
        ]
    )
    return [np.flatnonzero(buckets == p) for p in range(num_partitions)]


def _by_attribute(
    dataset: InteractionDataset, num_partitions: int, attribute: str
) -> list[np.ndarray]:
    if attribute not in dataset.user_features:
        raise ValueError(
            f"federated.partition_attribute {attribute!r} is not a user attribute of "
            f"{dataset.name!r}; available: {sorted(dataset.user_features)}"
        )
    values = dataset.user_features[attribute]
    return [np.flatnonzero(values == v) for v in sorted(set(values.tolist()))]


PARTITIONERS: dict[str, Partitioner] = {
    "user": _one_per_user,
    "hash": _by_hash,
    "attribute": _by_attribute,
}
SINGLE_USER = "user"  # the scheme whose clients are one user each (cross-device)


def partition_users(
    dataset: InteractionDataset, scheme: str, num_partitions: int = 0, attribute: str = ""
) -> list[np.ndarray]:
    """Internal user ids of each partition; every user is in exactly one."""
    if scheme not in PARTITIONERS:
        raise ValueError(f"federated.partitioning must be one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[scheme](dataset, num_partitions, attribute)
