"""The privacy ledger: every DP release of a run, per party, and the only source of ε.

Each round appends typed events (who released, by which mechanism, protecting which unit, with
which σ, q, steps and clip norm). Its ``state_dict`` travels with every checkpoint, so ε
continues across ``--resume`` and never resets.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fedrec.privacy.accounting import ACCOUNTANTS, Composition, epsilon

# What one unit of protection is. "event": one training window of a one-user client (record
# level); "user-within-silo": one user's sequence inside a cross-silo client; "user": one client's
# whole contribution across the federation (DP-FedAvg).
UNITS = ("event", "user-within-silo", "user")
UNIT_MEANING = {
    "event": "one interaction (event) of a user, on that user's device (record-level DP-SGD)",
    "user-within-silo": "one user's whole sequence inside a silo (record-level DP-SGD)",
    "user": "one client's whole contribution to the federation (user-level DP-FedAvg)",
}
MECHANISMS = ("dp-sgd", "dp-fedavg", "gaussian")


@dataclass(frozen=True)
class PrivacyEvent:
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

    @property
    def composition(self) -> Composition:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """Append-only record of DP releases, with ε per party from an Opacus accountant."""

    def __init__(self, accountant: str = "rdp"):
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}"
            )
        self.accountant = accountant
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
        """The party's compositions, merging consecutive runs of identical (σ, q)."""
        merged: list[Composition] = []
        for event in self.events:
            if event.party != party or event.steps == 0:
                continue
            sigma, q, steps = event.composition
            if merged and merged[-1][:2] == (sigma, q):
                merged[-1] = (sigma, q, merged[-1][2] + steps)
            else:
                merged.append((sigma, q, steps))
        return merged

    def epsilon(self, party: str, delta: float, extra: PrivacyEvent | None = None) -> float:
        """ε spent by ``party`` at ``delta``; with ``extra``, as if that event were recorded too."""
        history = self.history(party)
        if extra is not None:
            history.append(extra.composition)
        return epsilon(history, delta, self.accountant)

    def epsilon_by_round(self, party: str, delta: float) -> dict[int, float]:
        """Cumulative ε of ``party`` after each round in which it released something."""
        out: dict[int, float] = {}
        partial = PrivacyLedger(self.accountant)
        by_round: dict[int, list[PrivacyEvent]] = defaultdict(list)
        for event in self.events:
            if event.party == party:
                by_round[event.round].append(event)
        for round_number in sorted(by_round):
            partial.events.extend(by_round[round_number])
            out[round_number] = partial.epsilon(party, delta)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "events": [dataclasses.asdict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] != self.accountant:
            raise ValueError(
                f"checkpoint ledger uses the {state['accountant']!r} accountant, this run {self.accountant!r}"
            )
        self.events = [PrivacyEvent(**e) for e in state["events"]]


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
