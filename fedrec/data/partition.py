"""Who holds which users: the partition of a population into federated clients.

``user`` (cross-device, the default): one client per user. ``hash``: ``num_partitions`` silos
by a stable hash of the raw user id. ``attribute``: one silo per value of a user attribute
(e.g. occupation). Partitions are computed from ids alone, so every process derives the same
assignment without exchanging data.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedrec.data.dataset import InteractionDataset

SCHEMES = ("user", "hash", "attribute")


def partition_users(
    dataset: InteractionDataset, scheme: str, num_partitions: int = 0, attribute: str = ""
) -> list[np.ndarray]:
    """Internal user ids of each partition; every user is in exactly one."""
    if scheme == "user":
        return [np.array([u]) for u in range(dataset.num_users)]
    if scheme == "hash":
        if num_partitions < 1:
            raise ValueError("federated.num_partitions must be >= 1 for hash partitioning")
        buckets = np.array(
            [
                int.from_bytes(hashlib.sha256(str(raw).encode()).digest()[:8], "big")
                % num_partitions
                for raw in dataset.raw_user_ids
            ]
        )
        return [np.flatnonzero(buckets == p) for p in range(num_partitions)]
    if scheme == "attribute":
        if attribute not in dataset.user_features:
            raise ValueError(
                f"federated.partition_attribute {attribute!r} is not a user attribute of "
                f"{dataset.name!r}; available: {sorted(dataset.user_features)}"
            )
        values = dataset.user_features[attribute]
        return [np.flatnonzero(values == v) for v in sorted(set(values.tolist()))]
    raise ValueError(f"federated.partitioning must be one of {SCHEMES}, got {scheme!r}")
