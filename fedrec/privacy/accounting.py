"""Privacy math as pure functions over well-reviewed accountants.

fedrec never computes ε by its own formulas. A history of sampled Gaussian mechanisms is handed
to an accountant that matches the sampling actually run:

- Poisson sampling (each record or client joins a step independently with probability q),
  add/remove-one adjacency: Opacus' RDP or PRV accountant, history ``(σ, q, steps)``.
- Sampling a fixed-size cohort without replacement, replace-one adjacency: Google's
  ``dp_accounting`` RDP accountant with ``SampledWithoutReplacementDpEvent`` (Wang, Balle &
  Kasiviswanathan 2019), history ``(σ, cohort, population, steps)``. Opacus has no accountant
  for it, and Flower 1.42's ``PrivacyAccountant`` is this same backend behind a fixed config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dp_accounting
from dp_accounting import rdp
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
# The accountant for sampling without replacement (dp_accounting's RDP, replace-one).
WITHOUT_REPLACEMENT_ACCOUNTANT = "rdp-without-replacement"

Composition = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Poisson
CohortComposition = tuple[float, int, int, int]  # (noise_multiplier, cohort, population, steps)


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def epsilon(history: Sequence[Composition], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after Poisson-sampled Gaussian compositions (0 for an empty history)."""
    _check_delta(delta)
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return float("inf")  # a noiseless release has no finite guarantee
    engine = make_accountant(accountant)
    engine.history = steps
    return float(engine.get_epsilon(delta))


def epsilon_without_replacement(history: Sequence[CohortComposition], delta: float) -> float:
    """ε at ``delta`` (replace-one adjacency) after Gaussian mechanisms on fixed-size cohorts
    drawn without replacement. σ is relative to the replace-one sensitivity of the released sum."""
    _check_delta(delta)
    steps = [(float(s), int(m), int(n), int(t)) for s, m, n, t in history if t > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, *_ in steps):
        return float("inf")
    logging.getLogger("absl").setLevel(logging.ERROR)  # per-order convergence chatter
    engine = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, cohort, population, count in steps:
        event = dp_accounting.GaussianDpEvent(sigma)
        if cohort < population:
            event = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, event)
        engine.compose(event, count)
    return float(engine.get_epsilon(delta))
