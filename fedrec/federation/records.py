"""What one record of record-level DP is: the one place that decides it.

One-user clients (``partitioning: user``): each calendar period of ``record_period`` seconds
of a user's training events is a record (a user-day), cut to ``record_window + 1`` events, so
removing any one event changes exactly one record. Silos: a record is one whole user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedrec.data.batching import training_batch
from fedrec.data.partition import SINGLE_USER
from fedrec.data.records import record_spans
from fedrec.data.split import SequenceSplit
from fedrec.federation.config import FederatedConfig


@dataclass(frozen=True)
class RecordShape:
    """``window``: events per record (None: a whole user); ``period``: seconds per record
    (None: not cut by time); ``unit``: what the ledger says a record-level ε protects."""

    window: int | None
    period: int | None
    unit: str


def record_shape(fed: FederatedConfig) -> RecordShape:
    if fed.partitioning == SINGLE_USER:
        return RecordShape(fed.record_window, fed.record_period, "user-day")
    return RecordShape(None, None, "user-within-silo")


def event_windows(
    split: SequenceSplit, users: np.ndarray, window: int, period: int = 86400
) -> TensorDataset:
    """The records of each user's training history (``record_spans``), one example each:
    record-level DP-SGD then protects a user's day, and so any one of its events."""
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for user in users:
        lo, end = int(split.offsets[user]), int(split.offsets[user + 1]) - 2  # training part
        for start, stop in record_spans(split.timestamps[lo:end], window, period):
            items = split.items[lo + start : lo + stop] + 1
            times = split.timestamps[lo + start : lo + stop]
            pad = window - (len(items) - 1)
            rows.append(
                (
                    np.concatenate([np.zeros(pad, np.int64), items[:-1]]),
                    np.concatenate([np.zeros(pad, np.int64), times[:-1].astype(np.int64)]),
                    np.concatenate([np.zeros(pad, np.int64), items[1:]]),
                )
            )
    if not rows:  # no day with two events: no record (TensorDataset() has no length)
        return TensorDataset(*(torch.zeros((0, window), dtype=torch.int64) for _ in range(3)))
    return TensorDataset(*(torch.from_numpy(np.stack(c)) for c in zip(*rows, strict=True)))


def dp_records(
    split: SequenceSplit, users: np.ndarray, fed: FederatedConfig, max_len: int
) -> TensorDataset:
    """The records of record-level DP-SGD for a sequential model (see ``record_shape``)."""
    shape = record_shape(fed)
    if shape.window is not None and shape.period is not None:
        return event_windows(split, users, shape.window, shape.period)
    return TensorDataset(*training_batch(split, users, max_len))
