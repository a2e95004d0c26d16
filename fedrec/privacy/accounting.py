"""Privacy math as pure functions over Opacus accountants.

fedrec never computes ε by its own formulas: a history of Gaussian-mechanism compositions
``(noise_multiplier, sample_rate, steps)`` is handed to an Opacus accountant, so the numbers are
those of a well-reviewed implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

Composition = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def epsilon(history: Sequence[Composition], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after the compositions in ``history`` (0 for an empty history)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return float("inf")  # a noiseless release has no finite guarantee
    engine = make_accountant(accountant)
    engine.history = steps
    return float(engine.get_epsilon(delta))
