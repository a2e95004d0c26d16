"""The privacy ledger: every DP release of a run, per party, and the only source of ε.

Each round appends typed events (who released, by which mechanism, protecting which unit, with
which σ, sampling, steps, clip norm and accountant). Its ``state_dict`` travels with every
checkpoint (and a device's ledger file), so ε continues across ``--resume`` and never resets.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fedrec.privacy.accounting import (
    ACCOUNTANTS,
    WITHOUT_REPLACEMENT_ACCOUNTANT,
    CohortComposition,
    Composition,
    epsilon,
    epsilon_without_replacement,
)

# What one unit of protection is, and from whom each mechanism protects it.
UNITS = ("user-day", "user-within-silo", "user", "window")
UNIT_MEANING = {
    "user-day": (
        "one calendar day (UTC) of one user's activity: every event of that day, so also any "
        "single event (record-level DP-SGD on the device)"
    ),
    "user-within-silo": "one user's whole sequence inside a silo (record-level DP-SGD)",
    "user": "one client's whole contribution to the federation (user-level DP-FedAvg)",
    "window": (
        "one fixed-position window of a user's events (ledgers written before version 2: "
        "removing one event shifts every later window, so this is not event-level protection)"
    ),
}
MECHANISMS = ("dp-sgd", "dp-fedavg", "gaussian")
# Poisson: each unit joins a step independently (add/remove-one adjacency). Without
# replacement: a fixed-size cohort (replace-one adjacency). None: every unit, every step.
SAMPLINGS = ("poisson", "without-replacement")
ADJACENCY = {"poisson": "add or remove one unit", "without-replacement": "replace one unit"}
EVENT_ACCOUNTANTS = (*ACCOUNTANTS, WITHOUT_REPLACEMENT_ACCOUNTANT)


@dataclass(frozen=True)
class PrivacyEvent:
    """One DP release. With ``sampling="without-replacement"``, ``sample_rate`` is
    cohort / ``population`` and σ is relative to the replace-one sensitivity."""

    round: int
    party: str  # "client:<partition-id>" or "server"
    mechanism: str
    unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float  # the δ this party's guarantee is stated at
    note: str = ""
    sampling: str = "poisson"
    population: int = 0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.noise_multiplier < 0 or not 0 < self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(
                f"invalid event: noise_multiplier {self.noise_multiplier} (>= 0), sample_rate "
                f"{self.sample_rate} (in (0, 1]), steps {self.steps} (>= 0)"
            )
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if (self.sampling == "without-replacement") != (
            self.accountant == WITHOUT_REPLACEMENT_ACCOUNTANT
        ):
            raise ValueError(
                f"sampling without replacement is accounted by {WITHOUT_REPLACEMENT_ACCOUNTANT!r} "
                f"and only it; got sampling {self.sampling!r} with accountant {self.accountant!r}"
            )
        if self.accountant not in EVENT_ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {EVENT_ACCOUNTANTS}")
        if self.sampling == "without-replacement" and self.population < 1:
            raise ValueError("sampling without replacement needs the population size")

    @property
    def composition(self) -> Composition:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def cohort_composition(self) -> CohortComposition:
        cohort = round(self.sample_rate * self.population)
        return (self.noise_multiplier, cohort, self.population, self.steps)


def merged(events: list[PrivacyEvent]) -> list[Composition]:
    """The Poisson compositions of ``events``, identical (σ, q) merged into one (composition is
    commutative), in order of first appearance; releases of 0 steps dropped."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def merged_cohorts(events: list[PrivacyEvent]) -> list[CohortComposition]:
    steps: dict[tuple[float, int, int], int] = {}
    for event in events:
        sigma, cohort, population, count = event.cohort_composition
        if count:
            steps[(sigma, cohort, population)] = steps.get((sigma, cohort, population), 0) + count
    return [(*key, n) for key, n in steps.items()]


def _group_epsilon(events: list[PrivacyEvent], delta: float) -> float:
    """ε of events that share one accountant."""
    if events[0].accountant == WITHOUT_REPLACEMENT_ACCOUNTANT:
        return epsilon_without_replacement(merged_cohorts(events), delta)
    return epsilon(merged(events), delta, events[0].accountant)


class PrivacyLedger:
    """Append-only record of DP releases, with ε per party from the accountant its events name.
    A party whose events name several accountants (e.g. a device ledger older than a config
    change) gets the sum of each group's ε, each at an equal share of δ (basic composition)."""

    def __init__(self) -> None:
        self.events: list[PrivacyEvent] = []

    def record(self, event: PrivacyEvent) -> None:
        self.events.append(event)

    def parties(self) -> list[str]:
        return sorted({e.party for e in self.events})

    def delta(self, party: str) -> float:
        """The δ of ``party``'s guarantee (the smallest its events state)."""
        deltas = [e.delta for e in self.events if e.party == party]
        if not deltas:
            raise ValueError(f"no events for {party!r}")
        return min(deltas)

    def history(self, party: str) -> list[Composition]:
        """The party's compositions, identical (σ, q) merged."""
        return merged([e for e in self.events if e.party == party])

    def epsilon(self, party: str, delta: float, extra: PrivacyEvent | None = None) -> float:
        """ε spent by ``party`` at ``delta``; with ``extra``, as if that event were recorded too."""
        events = [e for e in self.events if e.party == party]
        if extra is not None:
            events.append(extra)
        groups: dict[str, list[PrivacyEvent]] = defaultdict(list)
        for event in events:
            groups[event.accountant].append(event)
        return sum(_group_epsilon(group, delta / len(groups)) for group in groups.values())

    def epsilon_by_round(self, party: str, delta: float) -> dict[int, float]:
        """Cumulative ε of ``party`` after each round in which it released something."""
        out: dict[int, float] = {}
        partial = PrivacyLedger()
        by_round: dict[int, list[PrivacyEvent]] = defaultdict(list)
        for event in self.events:
            if event.party == party:
                by_round[event.round].append(event)
        for round_number in sorted(by_round):
            partial.events.extend(by_round[round_number])
            out[round_number] = partial.epsilon(party, delta)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "events": [dataclasses.asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Version 1 ledgers named one Opacus accountant for all their (Poisson) events.
        default = {"accountant": state.get("accountant", "rdp")}
        legacy = {"unit": "window"} if state.get("version", 1) == 1 else {}
        self.events = [
            PrivacyEvent(**{**default, **e, **(legacy if e["unit"] == "event" else {})})
            for e in state["events"]
        ]


@dataclass(frozen=True)
class PrivacyBudget:
    """A party may not release once its ε at ``delta`` would exceed ``target_epsilon``."""

    target_epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if self.target_epsilon <= 0 or not 0 < self.delta < 1:
            raise ValueError("budget: target_epsilon must be > 0 and delta in (0, 1)")

    def allows(self, ledger: PrivacyLedger, event: PrivacyEvent) -> bool:
        return ledger.epsilon(event.party, self.delta, extra=event) <= self.target_epsilon
