"""Bias and fairness metrics: small pure functions over top-K lists and per-user metrics.

Item-side definitions follow RecBole's evaluator (coverage, Gini index, Shannon entropy, average
popularity) and Elliot (APLT, PopRSP); calibration follows Steck, "Calibrated recommendations"
(RecSys 2018). ``top_k`` is an int array [users, K] of item ids; ``-1`` marks an empty slot
(fewer than K rankable items), which counts as no recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupGap:
    """One metric compared across the groups of one user attribute."""

    means: dict[str, float]
    counts: dict[str, int]
    gap: float  # largest group mean minus smallest
    ratio: float  # smallest group mean / largest (1 = parity; nan when the largest is 0)
    ci_low: float  # basic bootstrap interval of ``gap``
    ci_high: float
    best: str
    worst: str
    small: dict[str, int]  # groups below the minimum size: reported, not compared


def group_gap(
    values: np.ndarray,
    groups: np.ndarray,
    rng: np.random.Generator,
    resamples: int = 1000,
    confidence: float = 0.95,
    min_size: int = 1,
) -> GroupGap | None:
    """Per-group means of ``values`` (one per user), the largest gap between two groups and a
    bootstrap confidence interval for it (users resampled within each group), so that a gap
    driven by a handful of users shows a wide interval. Users in group ``""`` (attribute
    unknown) are left out; groups under ``min_size`` users are listed in ``small`` and not
    compared (a group of one user has no spread to resample, so its interval would be
    zero-width). None when fewer than two groups are left."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups).astype(str)
    keep = groups != ""
    sizes = {g: int((groups[keep] == g).sum()) for g in sorted(set(groups[keep].tolist()))}
    labels = [g for g, n in sizes.items() if n >= min_size]
    if len(labels) < 2:
        return None
    members = [values[keep & (groups == g)] for g in labels]
    means = np.array([m.mean() for m in members])
    boot = np.stack([_bootstrap_means(m, rng, resamples) for m in members], axis=1)
    small = {g: n for g, n in sizes.items() if n < min_size}
    return gap_from_draws(labels, means, [len(m) for m in members], boot, confidence, small)


def gap_from_draws(
    labels: list[str],
    means: np.ndarray,
    counts: list[int],
    draws: np.ndarray,
    confidence: float,
    small: dict[str, int] | None = None,
) -> GroupGap:
    """The gap record from group means and resampled group means ``draws`` [resamples,
    groups] (bootstrap, or a normal approximation when only sums are known).

    The interval is the basic (reverse-percentile) bootstrap interval [2·gap − q_hi,
    2·gap − q_lo], floored at 0: max − min over many noisy group means is biased upwards, and
    its resampled values more so, so the plain percentile interval would sit above the true
    gap (false alarms with many small groups, e.g. 21 occupations); the basic interval
    corrects for that bias."""
    draw_gaps = draws.max(axis=1) - draws.min(axis=1)
    tail = (1 - confidence) / 2
    hi, lo = int(means.argmax()), int(means.argmin())
    gap = float(means[hi] - means[lo])
    return GroupGap(
        means={g: float(v) for g, v in zip(labels, means, strict=True)},
        counts={g: int(c) for g, c in zip(labels, counts, strict=True)},
        gap=gap,
        ratio=float(means[lo] / means[hi]) if means[hi] > 0 else float("nan"),
        ci_low=max(0.0, 2 * gap - float(np.quantile(draw_gaps, 1 - tail))),
        ci_high=max(0.0, 2 * gap - float(np.quantile(draw_gaps, tail))),
        best=labels[hi],
        worst=labels[lo],
        small=small or {},
    )


@dataclass(frozen=True)
class PairedDifference:
    """Mean per-user difference ``a - b`` of one metric measured twice on the same users."""

    mean: float
    ci_low: float  # percentile bootstrap interval (users resampled)
    ci_high: float
    users: int
    better: int  # users with a > b
    worse: int


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    rng: np.random.Generator,
    resamples: int = 10_000,
    confidence: float = 0.95,
) -> PairedDifference:
    """The paired comparison of two variants on the same users: resampling users (not the
    two columns apart) keeps each user's pair together, so the between-user spread, which
    dwarfs the effect on a few hundred users, cancels."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not len(diff):
        raise ValueError("paired_difference needs at least one user")
    tail = (1 - confidence) / 2
    draws = _bootstrap_means(diff, rng, resamples)
    return PairedDifference(
        mean=float(diff.mean()),
        ci_low=float(np.quantile(draws, tail)),
        ci_high=float(np.quantile(draws, 1 - tail)),
        users=len(diff),
        better=int((diff > 0).sum()),
        worse=int((diff < 0).sum()),
    )


def _bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    # Chunked so 10^5 users x 1000 resamples never materialise at once.
    out = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(len(values), 1))
    for lo in range(0, resamples, chunk):
        n = min(chunk, resamples - lo)
        out[lo : lo + n] = values[rng.integers(len(values), size=(n, len(values)))].mean(axis=1)
    return out


def exposure_counts(top_k: np.ndarray, num_items: int) -> np.ndarray:
    """How often each item appears in the top-K lists."""
    shown = top_k[top_k >= 0]
    return np.bincount(shown, minlength=num_items)


def item_coverage(exposure: np.ndarray) -> float:
    """Share of the catalogue recommended to at least one user."""
    return float((exposure > 0).mean())


def gini_index(exposure: np.ndarray) -> float:
    """Gini index of exposure over the whole catalogue (0: every item shown equally often,
    → 1: all exposure on one item), as RecBole's GiniIndex."""
    counts = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(counts), counts.sum()
    if total == 0:
        return float("nan")
    index = np.arange(1, n + 1)
    return float(np.sum((2 * index - n - 1) * counts) / (n * total))


def shannon_entropy(exposure: np.ndarray) -> float:
    """Shannon entropy (nats) of the exposure distribution over recommended items."""
    counts = np.asarray(exposure, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def average_popularity(top_k: np.ndarray, popularity: np.ndarray) -> float:
    """ARP: mean over users of the mean training popularity of their recommended items."""
    per_user = [popularity[row[row >= 0]].mean() for row in top_k if (row >= 0).any()]
    return float(np.mean(per_user)) if per_user else float("nan")


def long_tail_items(popularity: np.ndarray, tail_share: float = 0.2) -> np.ndarray:
    """Boolean mask of the long tail: the least popular items that together hold at most
    ``tail_share`` of all interactions (the rest is the short head)."""
    if not 0 < tail_share < 1:
        raise ValueError(f"tail_share must lie in (0, 1), got {tail_share}")
    popularity = np.asarray(popularity, dtype=np.float64)
    order = np.argsort(popularity, kind="stable")  # least popular first
    within = np.cumsum(popularity[order]) <= tail_share * popularity.sum()
    tail = np.zeros(len(popularity), dtype=bool)
    tail[order[within]] = True
    return tail


def average_long_tail_share(top_k: np.ndarray, tail: np.ndarray) -> float:
    """APLT: mean over users of the share of their top-K that are long-tail items."""
    per_user = [tail[row[row >= 0]].mean() for row in top_k if (row >= 0).any()]
    return float(np.mean(per_user)) if per_user else float("nan")


def popularity_rsp(top_k: np.ndarray, tail: np.ndarray, seen: list[np.ndarray]) -> float:
    """PopRSP (Zhu et al., SIGIR 2020, as Elliot): std / mean over {head, tail} of
    P(recommended | group) = recommended group items / group items the user has not seen,
    summed over users. 0 is parity of exposure between head and tail."""
    shown = np.zeros(2)
    available = np.zeros(2)
    head_size, tail_size = int((~tail).sum()), int(tail.sum())
    for row, items in zip(top_k, seen, strict=True):
        row = row[row >= 0]
        n_tail = int(tail[row].sum())
        shown += (len(row) - n_tail, n_tail)
        seen_tail = int(tail[np.unique(items)].sum())
        available += (head_size - (len(np.unique(items)) - seen_tail), tail_size - seen_tail)
    rate = shown / np.maximum(available, 1)
    return float(rate.std() / rate.mean()) if rate.mean() > 0 else float("nan")


def genre_matrix(item_genres: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """p(genre | item) as a [items, genres] matrix: each item's genres share its mass equally
    (Steck); items without genres have an all-zero row. ``item_genres``: space-separated."""
    tokens = [str(g).split() for g in item_genres]
    names = sorted({g for item in tokens for g in item})
    column = {g: j for j, g in enumerate(names)}
    matrix = np.zeros((len(tokens), len(names)))
    for i, item in enumerate(tokens):
        for g in item:
            matrix[i, column[g]] = 1 / len(item)
    return matrix, names


def calibration_kl(
    history: np.ndarray, recommended: np.ndarray, genres: np.ndarray, alpha: float = 0.01
) -> float:
    """Steck's miscalibration KL(p || q̃) of one user: p is the genre distribution of the
    history, q of the recommended items, q̃ = (1 − α)·q + α·p. nan when the history has no
    genre information."""
    p = _genre_distribution(history, genres)
    if p is None:
        return float("nan")
    q = _genre_distribution(recommended, genres)
    q = np.zeros_like(p) if q is None else q
    q_tilde = (1 - alpha) * q + alpha * p
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / q_tilde[support])))


def _genre_distribution(items: np.ndarray, genres: np.ndarray) -> np.ndarray | None:
    items = np.asarray(items)
    mass = genres[items[items >= 0]].sum(axis=0)
    total = mass.sum()
    return mass / total if total > 0 else None
