"""Empirical privacy audit of a trained model: membership inference and canary exposure.

A DP accountant says how much a model *may* leak; an attack says how much it *does* leak at
least. These pure functions turn attack scores into evidence: an AUC with an interval and a
p-value, a lower confidence bound on ε implied by the attack's ROC, and the "Secret Sharer"
exposure of inserted canaries. They never see a model, so the caller chooses the attack.

Convention: a *score* is higher for "more likely a member" (pass e.g. the negative loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

# Largest number of score cells per vectorised resampling batch (keeps memory near 32 MB).
_BATCH_CELLS = 4_000_000


@dataclass(frozen=True)
class EpsilonLowerBound:
    """The lower confidence bound on ε an attack implies, and where on its ROC it was found."""

    epsilon_lower: float
    threshold: float
    tpr: float
    fpr: float
    confidence: float
    delta: float


def _scores(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain only finite scores")
    return array


def _open_unit(value: float, name: str) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return float(value)


def _delta(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {value}")
    return float(value)


def _positive_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _pairwise_auc(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """AUC of each row pair via the Mann–Whitney U statistic, which vectorises over rows."""
    u = stats.mannwhitneyu(members, nonmembers, axis=-1, method="asymptotic").statistic
    return np.asarray(u, dtype=float) / (members.shape[-1] * nonmembers.shape[-1])


def _batch_size(rows: int, cells_per_row: int) -> int:
    return max(1, min(rows, _BATCH_CELLS // max(cells_per_row, 1)))


def membership_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of the attack: 0.5 means it cannot tell members from non-members at all."""
    m = _scores(members, "members")
    n = _scores(nonmembers, "nonmembers")
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(labels, np.concatenate([m, n])))


def bootstrap_auc_interval(
    members: np.ndarray,
    nonmembers: np.ndarray,
    rng: np.random.Generator,
    resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the AUC.

    The two groups are resampled separately so each resample keeps the audit's member /
    non-member sizes, which is how the data were collected.
    """
    m = _scores(members, "members")
    n = _scores(nonmembers, "nonmembers")
    resamples = _positive_count(resamples, "resamples")
    level = _open_unit(level, "level")
    aucs = np.empty(resamples)
    step = _batch_size(resamples, m.size + n.size)
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        boot_m = rng.choice(m, size=(rows, m.size), replace=True)
        boot_n = rng.choice(n, size=(rows, n.size), replace=True)
        aucs[start : start + rows] = _pairwise_auc(boot_m, boot_n)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(aucs, [tail, 1.0 - tail])
    return float(lo), float(hi)


def permutation_p_value(
    members: np.ndarray,
    nonmembers: np.ndarray,
    rng: np.random.Generator,
    permutations: int = 1000,
) -> float:
    """One-sided permutation p-value for AUC > 0.5.

    Shuffling labels gives the null of "membership does not affect the score" without any
    distributional assumption; the +1s make the estimate a valid p-value (never 0).
    """
    m = _scores(members, "members")
    n = _scores(nonmembers, "nonmembers")
    permutations = _positive_count(permutations, "permutations")
    observed = float(_pairwise_auc(m, n))
    pooled = np.concatenate([m, n])
    at_least = 0
    step = _batch_size(permutations, pooled.size)
    for start in range(0, permutations, step):
        rows = min(step, permutations - start)
        shuffled = rng.permuted(np.broadcast_to(pooled, (rows, pooled.size)), axis=1)
        null = _pairwise_auc(shuffled[:, : m.size], shuffled[:, m.size :])
        at_least += int(np.count_nonzero(null >= observed))
    return (1.0 + at_least) / (1.0 + permutations)


def _cp_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound (exact, so small counts are not overstated)."""
    k = np.asarray(successes, dtype=float)
    safe = np.maximum(k, 1.0)
    return np.where(k > 0, stats.beta.ppf(alpha, safe, trials - safe + 1.0), 0.0)


def _cp_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound."""
    k = np.asarray(successes, dtype=float)
    safe = np.minimum(k, trials - 1.0)
    return np.where(k < trials, stats.beta.ppf(1.0 - alpha, safe + 1.0, trials - safe), 1.0)


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray, delta: float) -> np.ndarray:
    """ln((num − δ) / den) where both are positive, −inf elsewhere (that test implies nothing)."""
    valid = (numerator > delta) & (denominator > 0)
    out = np.full(numerator.shape, -np.inf)
    np.log(numerator - delta, out=out, where=valid)
    out[valid] -= np.log(denominator[valid])
    return out


def empirical_epsilon(
    members: np.ndarray,
    nonmembers: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> EpsilonLowerBound:
    """Lower confidence bound on ε implied by the attack's ROC.

    (ε, δ)-DP forces every threshold test to satisfy TPR ≤ e^ε·FPR + δ and
    TNR ≤ e^ε·FNR + δ, so a test whose rates violate this for some ε shows the mechanism is
    not ε-DP. Rates are replaced by one-sided Clopper–Pearson bounds (TPR/TNR from below,
    FPR/FNR from above), with the error 1 − ``confidence`` split Bonferroni-style over the
    two bounds of one threshold. It is *not* split over thresholds: taking the max over the
    ROC afterwards is optimistic for the attacker, which is the standard practice of
    Jagielski et al. 2020 and Nasr et al. 2021. Treat the result as a heuristic audit, not a
    proof that the mechanism leaks this much.
    """
    m = _scores(members, "members")
    n = _scores(nonmembers, "nonmembers")
    delta = _delta(delta)
    confidence = _open_unit(confidence, "confidence")
    alpha = (1.0 - confidence) / 2.0

    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    fpr, tpr, thresholds = roc_curve(labels, np.concatenate([m, n]), drop_intermediate=False)
    tp = np.rint(tpr * m.size)
    fp = np.rint(fpr * n.size)

    tpr_lo = _cp_lower(tp, m.size, alpha)
    fpr_hi = _cp_upper(fp, n.size, alpha)
    tnr_lo = _cp_lower(n.size - fp, n.size, alpha)
    fnr_hi = _cp_upper(m.size - tp, m.size, alpha)
    per_threshold = np.maximum(_log_ratio(tpr_lo, fpr_hi, delta), _log_ratio(tnr_lo, fnr_hi, delta))

    best = int(np.argmax(per_threshold))
    if not np.isfinite(per_threshold[best]) or per_threshold[best] <= 0.0:
        return EpsilonLowerBound(0.0, math.nan, math.nan, math.nan, confidence, delta)
    return EpsilonLowerBound(
        epsilon_lower=float(per_threshold[best]),
        threshold=float(thresholds[best]),
        tpr=float(tpr[best]),
        fpr=float(fpr[best]),
        confidence=confidence,
        delta=delta,
    )


def check_dp_bound(
    members: np.ndarray,
    nonmembers: np.ndarray,
    epsilon: float,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Confront a claimed (ε, δ) with what the attack shows.

    An audit can refute a DP claim (the attack leaks more than ε allows) but never confirm it:
    a weak attack proves nothing. The verdict says which of the two happened.
    ``claimed_epsilon`` may be ``inf``, which ``json.dumps`` writes as ``Infinity``.
    """
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative number or inf, got {epsilon}")
    bound = empirical_epsilon(members, nonmembers, delta, confidence)
    lower = bound.epsilon_lower
    claimed = float(epsilon)
    setting = f"δ = {bound.delta:.3g} and {bound.confidence:.0%} confidence"
    if math.isinf(claimed):
        contradicts = False
        verdict = (
            f"The model claims no finite ε, so there is no bound to check; the attack alone "
            f"implies ε ≥ {lower:.3g} at {setting}."
        )
    elif lower > claimed:
        contradicts = True
        verdict = (
            f"The attack implies ε ≥ {lower:.3g} at {setting}, above the claimed "
            f"ε = {claimed:.3g}, so the privacy claim or its implementation is wrong."
        )
    else:
        contradicts = False
        verdict = (
            f"The attack implies only ε ≥ {lower:.3g} at {setting}, within the claimed "
            f"ε = {claimed:.3g}; this is consistent with the claim but does not prove it."
        )
    return {
        "claimed_epsilon": claimed,
        "delta": bound.delta,
        "empirical_epsilon_lower": lower,
        "confidence": bound.confidence,
        "contradicts": contradicts,
        "verdict": verdict,
    }


def max_exposure(reference_count: int) -> float:
    """Exposure of a canary ranked above every reference: the most the test can measure."""
    reference_count = _positive_count(reference_count, "reference_count")
    return math.log2(reference_count + 1)


def canary_exposure(canary_scores: np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """The "Secret Sharer" exposure (Carlini et al. 2019) of each canary against references.

    Exposure log2(R + 1) − log2(rank) measures, in bits, how much better the model ranks the
    inserted canary than random never-inserted candidates; 0 means no sign of memorisation.
    Only references scoring strictly higher push a canary down, so ties favour the canary.
    """
    canaries = _scores(canary_scores, "canary_scores")
    reference = np.sort(_scores(reference_scores, "reference_scores"))
    higher = reference.size - np.searchsorted(reference, canaries, side="right")
    rank = 1 + higher
    return np.asarray(max_exposure(reference.size) - np.log2(rank), dtype=float)


def mia_report(
    members: np.ndarray,
    nonmembers: np.ndarray,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    resamples: int = 1000,
    permutations: int = 1000,
) -> dict[str, Any]:
    """Everything a reader needs to judge one membership-inference audit, as plain JSON types."""
    m = _scores(members, "members")
    n = _scores(nonmembers, "nonmembers")
    lo, hi = bootstrap_auc_interval(m, n, rng, resamples=resamples)
    return {
        "members": int(m.size),
        "nonmembers": int(n.size),
        "auc": membership_auc(m, n),
        "auc_interval": [lo, hi],
        "p_value": float(permutation_p_value(m, n, rng, permutations=permutations)),
        "bound": check_dp_bound(m, n, epsilon, delta),
    }
