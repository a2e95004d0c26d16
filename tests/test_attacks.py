"""Membership-inference and canary audit functions, checked against independent oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from fedrec.privacy.attacks import (
    EpsilonLowerBound,
    bootstrap_auc_interval,
    canary_exposure,
    check_dp_bound,
    empirical_epsilon,
    max_exposure,
    membership_auc,
    mia_report,
    permutation_p_value,
)


def brute_force_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    wins = 0.0
    for m in members:
        for n in nonmembers:
            wins += 1.0 if m > n else 0.5 if m == n else 0.0
    return wins / (len(members) * len(nonmembers))


def randomized_response(
    eps: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an ε-DP mechanism: the exact privacy of each release is known."""
    p = math.exp(eps) / (1.0 + math.exp(eps))
    members = (rng.random(n) < p).astype(float)
    nonmembers = (rng.random(n) < 1.0 - p).astype(float)
    return members, nonmembers


def separated(n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(10.0, 11.0, n), np.linspace(0.0, 1.0, n)


def identical(n: int = 4000, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(size=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.5, 1.0, size=37), 1)  # rounding creates ties
    nonmembers = np.round(rng.normal(0.0, 1.0, size=53), 1)
    assert membership_auc(members, nonmembers) == pytest.approx(
        brute_force_auc(members, nonmembers), abs=1e-12
    )


def test_separated_scores_give_extreme_statistics() -> None:
    members, nonmembers = separated(50)
    rng = np.random.default_rng(0)
    assert membership_auc(members, nonmembers) == 1.0
    assert permutation_p_value(members, nonmembers, rng, permutations=200) == 1.0 / 201.0
    assert bootstrap_auc_interval(members, nonmembers, rng, resamples=200) == (1.0, 1.0)


def test_identical_distributions_look_like_chance() -> None:
    members, nonmembers = identical()
    rng = np.random.default_rng(1)
    auc = membership_auc(members, nonmembers)
    assert abs(auc - 0.5) < 0.03
    assert permutation_p_value(members, nonmembers, rng, permutations=300) > 0.05
    lo, hi = bootstrap_auc_interval(members, nonmembers, rng, resamples=300)
    assert lo <= auc <= hi
    assert lo < 0.5 < hi


def test_permutation_p_value_is_reproducible_and_valid() -> None:
    rng_scores = np.random.default_rng(3)
    members, nonmembers = rng_scores.normal(0.2, 1, 300), rng_scores.normal(0, 1, 300)
    p1 = permutation_p_value(members, nonmembers, np.random.default_rng(5), permutations=199)
    p2 = permutation_p_value(members, nonmembers, np.random.default_rng(5), permutations=199)
    assert p1 == p2
    assert 1.0 / 200.0 <= p1 <= 1.0


def test_empirical_epsilon_for_separated_scores_matches_clopper_pearson() -> None:
    members, nonmembers = separated(1000)
    bound = empirical_epsilon(members, nonmembers, delta=0.0, confidence=0.95)
    # The best threshold is the lowest member score: TPR = 1000/1000, FPR = 0/1000.
    alpha = 0.05 / 2
    tpr_lo = stats.beta.ppf(alpha, 1000, 1)
    fpr_hi = stats.beta.ppf(1 - alpha, 1, 1000)
    expected = math.log(tpr_lo / fpr_hi)
    assert math.isfinite(bound.epsilon_lower)
    assert bound.epsilon_lower == pytest.approx(expected, rel=1e-9)
    assert bound.epsilon_lower > 5.0
    assert (bound.tpr, bound.fpr) == (1.0, 0.0)
    assert bound.threshold == pytest.approx(10.0)
    assert (bound.confidence, bound.delta) == (0.95, 0.0)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_empirical_epsilon_is_sound_and_tight_for_randomized_response(eps: float) -> None:
    members, nonmembers = randomized_response(eps, 20000, np.random.default_rng(11))
    bound = empirical_epsilon(members, nonmembers, delta=1e-5)
    assert 0.7 * eps < bound.epsilon_lower < eps
    assert bound.threshold == 1.0


def test_empirical_epsilon_is_small_for_identical_distributions() -> None:
    members, nonmembers = identical()
    bound = empirical_epsilon(members, nonmembers, delta=1e-5)
    assert 0.0 <= bound.epsilon_lower < 0.3


def test_empirical_epsilon_without_evidence_is_zero_and_nan() -> None:
    bound = empirical_epsilon(np.zeros(10), np.zeros(10), delta=0.0)
    assert bound.epsilon_lower == 0.0
    assert math.isnan(bound.threshold)
    assert isinstance(bound, EpsilonLowerBound)


def test_large_delta_weakens_the_bound() -> None:
    members, nonmembers = randomized_response(1.0, 20000, np.random.default_rng(2))
    small = empirical_epsilon(members, nonmembers, delta=1e-5).epsilon_lower
    large = empirical_epsilon(members, nonmembers, delta=0.2).epsilon_lower
    assert large < small


def test_check_dp_bound_flags_a_violated_claim() -> None:
    result = check_dp_bound(*separated(1000), epsilon=1.0, delta=1e-5)
    assert result["contradicts"] is True
    assert result["empirical_epsilon_lower"] > 1.0
    assert set(result) == {
        "claimed_epsilon",
        "delta",
        "empirical_epsilon_lower",
        "confidence",
        "contradicts",
        "verdict",
    }
    json.dumps(result)


def test_check_dp_bound_accepts_a_true_claim() -> None:
    members, nonmembers = randomized_response(1.0, 20000, np.random.default_rng(11))
    result = check_dp_bound(members, nonmembers, epsilon=1.0, delta=1e-5)
    assert result["contradicts"] is False
    assert "does not prove" in result["verdict"]


def test_check_dp_bound_with_infinite_claim_never_contradicts() -> None:
    result = check_dp_bound(*separated(1000), epsilon=math.inf, delta=1e-5)
    assert result["contradicts"] is False
    assert result["claimed_epsilon"] == math.inf
    assert "no bound to check" in result["verdict"]


def test_canary_exposure_by_hand() -> None:
    reference = np.array([0.1, 0.2, 0.3])
    exposure = canary_exposure(np.array([0.25, 0.9, 0.0, 0.3]), reference)
    # ranks: 2 (only 0.3 above), 1 (above all), 4 (below all), 1 (tie is not "above")
    np.testing.assert_allclose(exposure, [1.0, 2.0, 0.0, 2.0])
    assert max_exposure(3) == 2.0
    assert max_exposure(1023) == pytest.approx(10.0)


def test_mia_report_is_json_ready() -> None:
    rng = np.random.default_rng(4)
    members, nonmembers = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 300)
    report = mia_report(members, nonmembers, 2.0, 1e-5, rng, resamples=200, permutations=200)
    assert report["members"] == 200 and report["nonmembers"] == 300
    assert report["auc"] == pytest.approx(brute_force_auc(members, nonmembers))
    lo, hi = report["auc_interval"]
    assert lo <= report["auc"] <= hi
    assert report["p_value"] == 1.0 / 201.0
    assert report["bound"]["claimed_epsilon"] == 2.0
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    for value in (report["auc"], report["p_value"], lo, hi):
        assert type(value) is float
    assert type(report["bound"]["contradicts"]) is bool


GOOD = np.array([0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: membership_auc(np.array([]), GOOD), "members"),
        (lambda: membership_auc(GOOD, np.array([0.1, np.nan])), "nonmembers"),
        (lambda: membership_auc(np.array([np.inf]), GOOD), "members"),
        (lambda: membership_auc(np.ones((2, 2)), GOOD), "members"),
        (
            lambda: bootstrap_auc_interval(GOOD, GOOD, np.random.default_rng(), level=1.0),
            "level",
        ),
        (lambda: bootstrap_auc_interval(GOOD, GOOD, np.random.default_rng(), 0), "resamples"),
        (lambda: permutation_p_value(GOOD, GOOD, np.random.default_rng(), 0), "permutations"),
        (lambda: empirical_epsilon(GOOD, GOOD, delta=1.0), "delta"),
        (lambda: empirical_epsilon(GOOD, GOOD, delta=-0.1), "delta"),
        (lambda: empirical_epsilon(GOOD, GOOD, 0.0, confidence=0.0), "confidence"),
        (lambda: check_dp_bound(GOOD, GOOD, epsilon=-1.0, delta=0.0), "epsilon"),
        (lambda: check_dp_bound(GOOD, GOOD, epsilon=math.nan, delta=0.0), "epsilon"),
        (lambda: canary_exposure(np.array([]), GOOD), "canary_scores"),
        (lambda: canary_exposure(GOOD, np.array([np.nan])), "reference_scores"),
        (lambda: max_exposure(0), "reference_count"),
        (
            lambda: mia_report(GOOD, GOOD, 1.0, 0.0, np.random.default_rng(), resamples=0),
            "resamples",
        ),
    ],
)
def test_invalid_inputs_name_the_argument(call, argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument} "):
        call()
