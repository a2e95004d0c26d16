"""A client's own data: the one place a federated client reads interactions from.

A client holds raw events (its users' item ids and times) and the server's item catalogue,
never the population's data set. ``ClientData`` is that boundary: a simulation writes each
client's partition to an ``EventStore`` folder; a device would implement the same protocol
over its encrypted store. ``client_split`` turns the events into the model's split.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.dataset import InteractionDataset, remap_ids
from fedrec.data.split import SequenceSplit
from fedrec.errors import FedrecDataError

log = logging.getLogger(__name__)

EVENTS_FORMAT = "fedrec-events/1"
MIN_EVENTS = 3  # leave-one-out needs a training, a validation and a test item


@dataclass(eq=False)
class RawEvents:
    """Events in raw ids, as a device records them; normalised to str / int64 arrays.
    ``ratings``: each event's rating (NaN where none was given), or None."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.users = np.array([str(u) for u in np.asarray(self.users).ravel()], dtype=object)
        self.items = np.array([str(i) for i in np.asarray(self.items).ravel()], dtype=object)
        times = np.asarray(self.timestamps).ravel()
        if times.dtype.kind == "f" and not np.array_equal(times, np.floor(times)):
            # Truncating would create ties and could reorder a user's events.
            raise ValueError("timestamps must be whole numbers (e.g. seconds)")
        self.timestamps = times.astype(np.int64)
        if self.ratings is not None:
            self.ratings = np.asarray(self.ratings, dtype=np.float64).ravel()
        n = len(self.users)
        for name in ("items", "timestamps", *(("ratings",) if self.ratings is not None else ())):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.users)


class ClientData(Protocol):
    """The only interface a client reads personal data through."""

    def events(self) -> RawEvents: ...

    def user_attributes(self) -> dict[str, dict[str, str]]: ...


class EventStore:
    """A folder holding one client's events (``events.json``; a ``ratings`` column when the
    events have ratings, null for an unrated one) and user attributes (``users.json``),
    readable by its owner only since both are personal data."""

    EVENTS = "events.json"
    USERS = "users.json"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def write(
        cls, folder: Path, events: RawEvents, attributes: dict[str, dict[str, str]]
    ) -> EventStore:
        folder = Path(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by umask and ignored if it exists
        _write_private(
            folder / cls.EVENTS,
            {
                "format": EVENTS_FORMAT,
                "users": events.users.tolist(),
                "items": events.items.tolist(),
                "timestamps": events.timestamps.tolist(),
                **(
                    {}
                    if events.ratings is None
                    else {"ratings": [None if np.isnan(r) else r for r in events.ratings.tolist()]}
                ),
            },
        )
        _write_private(
            folder / cls.USERS,
            {str(u): {str(k): str(v) for k, v in a.items()} for u, a in attributes.items()},
        )
        return cls(folder)

    def events(self) -> RawEvents:
        path = self.folder / self.EVENTS
        document = _read_json(path)
        if not isinstance(document, dict) or document.get("format") != EVENTS_FORMAT:
            raise FedrecDataError(f"not an event store file of format {EVENTS_FORMAT!r}", path)
        columns = [document.get(k) for k in ("users", "items", "timestamps")]
        if not all(isinstance(c, list) for c in columns):
            raise FedrecDataError("events need list columns users, items, timestamps", path)
        ratings = document.get("ratings")
        if ratings is not None and not (
            isinstance(ratings, list)
            and all(
                r is None or (isinstance(r, int | float) and not isinstance(r, bool))
                for r in ratings
            )
        ):
            raise FedrecDataError("ratings must be a list of numbers (null: unrated)", path)
        try:
            users, items, timestamps = (np.asarray(c) for c in columns)
            return RawEvents(
                users,
                items,
                timestamps,
                None
                if ratings is None
                else np.array([np.nan if r is None else r for r in ratings], dtype=np.float64),
            )
        except (TypeError, ValueError) as err:
            raise FedrecDataError(f"malformed events ({err})", path) from err

    def user_attributes(self) -> dict[str, dict[str, str]]:
        path = self.folder / self.USERS
        document = _read_json(path)
        if not isinstance(document, dict) or not all(
            isinstance(a, dict) and all(isinstance(v, str) for v in a.values())
            for a in document.values()
        ):
            raise FedrecDataError("user attributes must map user id -> {attribute: text}", path)
        return document


def _write_private(path: Path, document: Any) -> None:
    """Atomic write of a file only its owner can read (the mode is set before any byte)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedrecDataError("missing from the client's event store", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise FedrecDataError(f"cannot read the client's event store ({err})", path) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FedrecDataError(f"corrupt event store file ({err.msg})", path, err.lineno) from err


@dataclass
class ClientSplit:
    """The leave-one-out split of a client's users, plus what could not be used and why."""

    split: SequenceSplit
    users: tuple[str, ...]  # raw id of split user u
    skipped_events: int  # events whose item the catalogue does not list
    dropped_users: tuple[str, ...]  # users left with fewer than MIN_EVENTS known events


def client_split(
    events: RawEvents,
    catalogue: ItemCatalogue,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
) -> ClientSplit:
    """Split a client's own events as ``leave_one_out`` splits the population's; the split
    carries the events' ratings and, with ``attributes`` (raw user id -> {name: value}), each
    user's attributes (missing ones "").

    Unknown items are skipped, not fatal: a device may have seen items newer than the
    catalogue revision it holds, and one stale item must not stop it from training.
    """
    indices, known = catalogue.map_items(events.items)
    skipped = int((~known).sum())
    if skipped:
        log.warning(
            "skipped %d event(s) of %d distinct item(s) not in catalogue revision %d",
            skipped,
            len(set(events.items[~known].tolist())),
            catalogue.revision,
        )
    user_of, raw_users = remap_ids(events.users)  # ids in order of first appearance
    user_of, items, times = user_of[known], indices[known], events.timestamps[known]
    counts = np.bincount(user_of, minlength=len(raw_users))
    kept = counts >= MIN_EVENTS
    dropped = tuple(str(u) for u in raw_users[~kept].tolist())
    if dropped:
        log.warning(
            "dropped %d user(s) with fewer than %d known events (leave-one-out needs %d): %s",
            len(dropped),
            MIN_EVENTS,
            MIN_EVENTS,
            ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""),
        )
    # By user (first appearance), then time; ties keep the store's order, like leave_one_out.
    order = np.lexsort((np.arange(len(user_of)), times, user_of))
    order = order[kept[user_of[order]]]
    split = SequenceSplit(
        num_users=int(kept.sum()),
        num_items=catalogue.num_items,
        offsets=np.concatenate([[0], np.cumsum(counts[kept])]).astype(np.int64),
        items=items[order].astype(np.int64),
        # float64, as leave_one_out gives: the same model inputs on a device and in simulation
        timestamps=times[order].astype(np.float64),
        ratings=None if events.ratings is None else events.ratings[known][order],
    )
    users = tuple(str(u) for u in raw_users[kept].tolist())
    if attributes:
        names = sorted({name for user in users for name in attributes.get(user, {})})
        split.user_features = {
            name: np.array([attributes.get(u, {}).get(name, "") for u in users], dtype=object)
            for name in names
        }
    return ClientSplit(split=split, users=users, skipped_events=skipped, dropped_users=dropped)


def partition_events(
    dataset: InteractionDataset, split: SequenceSplit, users: Sequence[int] | np.ndarray
) -> RawEvents:
    """The raw events of internal ``users``, in ``split`` order: what a simulation writes to
    each client's store so that the client sees exactly its partition and nothing else."""
    users = np.asarray(users, dtype=np.int64)
    if split.num_items != dataset.num_items:
        raise ValueError(
            f"split has {split.num_items} items but the data set {dataset.num_items}; "
            "pass the split made from this data set"
        )
    if len(np.unique(users)) != len(users):
        raise ValueError("users lists a user twice; a user belongs to one client")
    if len(users) and (users.min() < 0 or users.max() >= min(split.num_users, dataset.num_users)):
        raise ValueError("users must be internal ids of both the data set and the split")
    part = split.subset(users)
    return RawEvents(
        users=np.repeat(dataset.raw_user_ids[users], np.diff(part.offsets)),
        items=dataset.raw_item_ids[part.items],
        timestamps=part.timestamps,
        ratings=part.ratings,
    )
