"""Records for record-level DP: which of a user's events form one record."""

from __future__ import annotations

import numpy as np


def record_spans(timestamps: np.ndarray, window: int, period: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each record in one user's time-ordered training events: the first
    ``window + 1`` events of each calendar period (UTC), periods with at least two events.

    Membership depends only on an event's own timestamp, never on its position, so removing
    one event changes exactly one record (or removes it); the events a period has beyond
    ``window + 1`` are not trained on under record-level DP.
    """
    buckets = np.floor_divide(np.asarray(timestamps, dtype=np.int64), period)
    if not len(buckets):
        return []
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    stops = [*starts[1:].tolist(), len(buckets)]
    return [
        (int(a), int(min(b, a + window + 1)))
        for a, b in zip(starts, stops, strict=True)
        if b - a > 1
    ]
