"""User groups an audit compares: demographic attributes and activity level."""

from __future__ import annotations

import numpy as np

# MovieLens-1M's age bands, used for any numeric age column (ML-100K stores raw ages).
AGE_BANDS = ((0, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"))
OLDEST_BAND = "56+"


def age_band(age: str) -> str:
    """The band of a raw age (``"24"`` → ``"18-24"``); non-numeric values (already bands, or
    ``""`` for unknown) pass through."""
    try:
        years = int(age)
    except ValueError:
        return age
    if years < 0:
        return ""  # not an age: unknown
    if years >= 56:
        return OLDEST_BAND
    return next(name for start, name in reversed(AGE_BANDS) if years >= start)


def activity_terciles(history_lengths: np.ndarray) -> np.ndarray:
    """``low``/``mid``/``high``: users split into three equal-sized groups by history length
    (ties broken by user order, so the groups stay equal in size)."""
    order = np.argsort(history_lengths, kind="stable")
    labels = np.empty(len(order), dtype=object)
    for name, chunk in zip(("low", "mid", "high"), np.array_split(order, 3), strict=True):
        labels[chunk] = name
    return labels


def most_active(history_lengths: np.ndarray, share: float = 0.05) -> np.ndarray:
    """``top-5%`` for the most active ``share`` of users (at least one), ``rest`` otherwise —
    the advantaged/disadvantaged split of Li et al., "User-oriented fairness in
    recommendation" (WWW 2021)."""
    n_top = max(1, int(np.ceil(share * len(history_lengths))))
    order = np.argsort(-np.asarray(history_lengths), kind="stable")
    labels = np.full(len(order), "rest", dtype=object)
    labels[order[:n_top]] = f"top-{share:.0%}"
    return labels


def user_groups(
    user_features: dict[str, np.ndarray],
    history_lengths: np.ndarray,
    attributes: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Group label per user for every audited attribute present in ``user_features`` (numeric
    ages banded), plus ``activity`` (terciles) and ``most-active``."""
    groups: dict[str, np.ndarray] = {}
    for name in attributes:
        if name not in user_features:
            continue
        values = np.asarray(user_features[name]).astype(str)
        if name == "age":  # each distinct age banded once: one label object per band
            ages, of_user = np.unique(values, return_inverse=True)
            values = np.array([age_band(v) for v in ages.tolist()], dtype=object)[of_user]
        groups[name] = values
    groups["activity"] = activity_terciles(history_lengths)
    groups["most-active"] = most_active(history_lengths)
    return groups
