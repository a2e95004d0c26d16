"""The in-memory interaction data set every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class InteractionDataset:
    """Interactions with ids remapped to contiguous integers ``0..n-1``.

    ``raw_user_ids[u]`` / ``raw_item_ids[i]`` give the original token of internal id ``u`` / ``i``.
    ``item_features`` and ``user_features`` are column tables aligned with internal ids (one
    string per row; missing values are empty strings).
    """

    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    user_features: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        for col_name in ("item_ids", "timestamps"):
            if len(getattr(self, col_name)) != n:
                raise ValueError(
                    f"{col_name} has {len(getattr(self, col_name))} rows, expected {n}"
                )
        if self.ratings is not None and len(self.ratings) != n:
            raise ValueError(f"ratings has {len(self.ratings)} rows, expected {n}")
        for table, size in (
            (self.item_features, self.num_items),
            (self.user_features, self.num_users),
        ):
            for col_name, values in table.items():
                if len(values) != size:
                    raise ValueError(
                        f"feature column {col_name!r} has {len(values)} rows, expected {size}"
                    )
        if n and (self.user_ids.min() < 0 or self.user_ids.max() >= self.num_users):
            raise ValueError("user_ids must lie in 0..num_users-1")
        if n and (self.item_ids.min() < 0 or self.item_ids.max() >= self.num_items):
            raise ValueError("item_ids must lie in 0..num_items-1")

    @property
    def num_users(self) -> int:
        return len(self.raw_user_ids)

    @property
    def num_items(self) -> int:
        return len(self.raw_item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.user_ids)

    def summary(self) -> dict[str, float | int | str]:
        lengths = np.bincount(self.user_ids, minlength=self.num_users)
        density = self.num_interactions / max(1, self.num_users * self.num_items)
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": round(float(density), 6),
            "mean_sequence_length": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "max_sequence_length": int(lengths.max()) if len(lengths) else 0,
        }

    def subset(self, mask: np.ndarray) -> InteractionDataset:
        """Keep the interactions where ``mask`` is true and re-index users and items densely.

        Users and items left with no interaction are dropped from the id maps and tables.
        """
        kept_users, new_users = _dense_ids(self.user_ids[mask], self.num_users)
        kept_items, new_items = _dense_ids(self.item_ids[mask], self.num_items)
        return InteractionDataset(
            name=self.name,
            user_ids=new_users,
            item_ids=new_items,
            timestamps=self.timestamps[mask],
            ratings=None if self.ratings is None else self.ratings[mask],
            raw_user_ids=self.raw_user_ids[kept_users],
            raw_item_ids=self.raw_item_ids[kept_items],
            item_features={k: v[kept_items] for k, v in self.item_features.items()},
            user_features={k: v[kept_users] for k, v in self.user_features.items()},
        )


def _dense_ids(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the ids present in ``ids``, ascending; ``ids`` renumbered 0..len-1 in that order): what
    ``np.unique(ids, return_inverse=True)`` gives, by a count over ``0..size-1`` instead of a
    sort of every event."""
    present = np.bincount(ids, minlength=size) > 0
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present), rank[ids].astype(np.int64, copy=False)


def remap_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw tokens to contiguous ids in order of first appearance.

    Returns ``(ids, vocabulary)`` with ``vocabulary[ids] == raw``.
    """
    vocabulary, first_index, inverse = np.unique(raw, return_index=True, return_inverse=True)
    order = np.argsort(first_index, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64), vocabulary[order]


def attach_table(
    vocabulary: np.ndarray, table_ids: np.ndarray, columns: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Align side-table columns keyed by raw id with the internal ids of ``vocabulary``.

    Ids of the data set that the table does not list get empty strings.
    """
    position = {token: row for row, token in enumerate(table_ids.tolist())}
    rows = np.array([position.get(token, -1) for token in vocabulary.tolist()], dtype=np.int64)
    aligned: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        out = np.full(len(vocabulary), "", dtype=object)
        found = rows >= 0
        out[found] = values[rows[found]]
        aligned[name] = out
    return aligned
