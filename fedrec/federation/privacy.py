"""Every privacy release of a federated round as a ledger event, ε so far, and what the report
must disclose beyond the ledger. Pure functions of the config sections: the client round, the
server round and the reports all call these, so the events are the same wherever recorded."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.audits import AuditConfig
from fedrec.federation.config import FederatedConfig
from fedrec.federation.records import record_shape
from fedrec.privacy.accounting import WITHOUT_REPLACEMENT_ACCOUNTANT
from fedrec.privacy.dp_sgd import DEFAULT_RECORD_DELTA, plan_dp
from fedrec.privacy.ledger import PrivacyEvent, PrivacyLedger


def client_party(partition: int) -> str:
    return f"client:{partition}"


def client_seed(seed: int, round_number: int, partition: int, stream: int = 0) -> int:
    """The torch/numpy seed of one client's local training in one round (dropout, negatives);
    ``stream`` 1 is its DP noise in the reproducible mode, 2 its audit noise. Distinct for every
    (seed, round, partition, stream): a linear formula would give two clients of two rounds one
    stream."""
    state = np.random.SeedSequence([seed, round_number, partition, stream]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1


def noise_seed(
    fed: FederatedConfig, seed: int, round_number: int, partition: int, stream: int = 1
) -> int | None:
    """The seed of a client's DP noise: None (private, from OS entropy) unless the config asks
    for ``reproducible_noise``."""
    if not fed.reproducible_noise:
        return None
    return client_seed(seed, round_number, partition, stream)


def planned_record_event(
    fed: FederatedConfig, records: int, partition: int, round_number: int
) -> PrivacyEvent | None:
    """The record-level DP release client ``partition`` would make this round on ``records``
    records, known before it trains (for its budget check); None without DP or records."""
    if fed.record_dp is None or records == 0:
        return None
    plan = plan_dp(records, fed.record_dp, fed.local_epochs, fed.num_rounds)
    return PrivacyEvent(
        round=round_number,
        party=client_party(partition),
        mechanism="dp-sgd",
        unit=record_shape(fed).unit,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        clip_norm=fed.record_dp.max_grad_norm,
        delta=plan.delta,
        accountant=fed.record_dp.accountant,
    )


def reported_record_event(
    fed: FederatedConfig, partition: int, round_number: int, dp: Mapping[str, float]
) -> PrivacyEvent:
    """A client's DP-SGD release as its reply states it (``DP_METRICS``)."""
    return PrivacyEvent(
        round=round_number,
        party=client_party(partition),
        mechanism="dp-sgd",
        unit=record_shape(fed).unit,
        noise_multiplier=float(dp["dp-noise-multiplier"]),
        sample_rate=float(dp["dp-sample-rate"]),
        steps=int(dp["dp-steps"]),
        clip_norm=float(dp["dp-clip-norm"]),
        delta=float(dp["dp-delta"]),
        accountant=fed.record_dp.accountant if fed.record_dp else "rdp",
    )


DP_METRICS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm", "dp-delta")


def event_metrics(event: PrivacyEvent | None) -> dict[str, float]:
    """The DP keys of a reply (all zero: nothing released; dp-steps 0 is what the server reads)."""
    if event is None:
        return {key: 0 if key == "dp-steps" else 0.0 for key in DP_METRICS}
    return {
        "dp-noise-multiplier": event.noise_multiplier,
        "dp-sample-rate": event.sample_rate,
        "dp-steps": event.steps,
        "dp-clip-norm": event.clip_norm,
        "dp-delta": event.delta,
    }


def central_event(fed: FederatedConfig, num_clients: int, round_number: int) -> PrivacyEvent:
    """The server's user-level DP release of one round (``server.dp.UserLevelDP``). The noise
    is on the sum and the divisor is public, so replies that are missing do not change σ:
    every round is the same release."""
    central = fed.central_dp
    assert central is not None
    cohort = fed.sampled_clients(num_clients)
    event = PrivacyEvent(
        round=round_number,
        party="server",
        mechanism="dp-fedavg",
        unit="user",
        noise_multiplier=central.noise_multiplier,
        sample_rate=cohort / num_clients,
        steps=1,
        clip_norm=central.clipping_norm,
        delta=central.delta_for(num_clients),
    )
    if central.sampling == "poisson":
        return event
    # Replace-one adjacency: swapping one client moves the sum of clipped updates by up to 2C,
    # so σ relative to that sensitivity is half the configured one.
    return dataclasses.replace(
        event,
        noise_multiplier=central.noise_multiplier / 2,
        sampling="without-replacement",
        population=num_clients,
        accountant=WITHOUT_REPLACEMENT_ACCOUNTANT,
    )


def exposure_event(
    fed: FederatedConfig, audit: AuditConfig, partition: int, round_number: int
) -> PrivacyEvent:
    """A client's noised top-K exposure histogram (the federated audit) as a ledger event.

    One user's top-K list is a K-hot vector; any change to the user's data can swap it for
    another K-hot vector, an L2 change of at most √(2K): the Gaussian's multiplier is σ / √(2K),
    a guarantee for the client's whole data and so for each of its records.
    """
    sensitivity = math.sqrt(2 * audit.k)
    return PrivacyEvent(
        round=round_number,
        party=client_party(partition),
        mechanism="gaussian",
        unit=record_shape(fed).unit if fed.record_dp is not None else "user",
        noise_multiplier=audit.exposure_noise / sensitivity,
        sample_rate=1.0,
        steps=1,
        clip_norm=sensitivity,
        delta=fed.record_dp.delta if fed.record_dp is not None else DEFAULT_RECORD_DELTA,
        note="audit exposure histogram",
        accountant=fed.record_dp.accountant if fed.record_dp is not None else "rdp",
    )


def epsilons_so_far(
    ledger: PrivacyLedger, fed: FederatedConfig, num_clients: int
) -> dict[str, float]:
    """ε so far, each with its δ: the federation's (user-level DP-FedAvg) and the largest of
    any client's (record-level, and audit releases)."""
    out: dict[str, float] = {}
    if fed.central_dp is not None:
        out["federation_delta"] = fed.central_dp.delta_for(num_clients)
        out["federation"] = ledger.epsilon("server", out["federation_delta"])
    clients = [p for p in ledger.parties() if p.startswith("client:")]
    if clients:
        out["client_max"] = max(ledger.epsilon(p, ledger.delta(p)) for p in clients)
        out["client_max_delta"] = max(ledger.delta(p) for p in clients)
    return out


def epsilon_text(spent: Mapping[str, float]) -> str:
    """``epsilons_so_far`` for a log line: every ε next to its δ."""
    parts = [
        f"{label} ε {spent[key]:.2f} (δ {spent[key + '_delta']:.1e})"
        for key, label in (("federation", "federation"), ("client_max", "clients max"))
        if key in spent
    ]
    return "".join(f"  {p}" for p in parts)


def device_lifetime(folder: Path) -> dict[str, Any] | None:
    """ε of the simulated devices' own ledgers (every run they joined), or None without any."""
    files = sorted(folder.glob("client-*.json")) if folder.is_dir() else []
    spent = []
    for path in files:
        ledger = PrivacyLedger()
        ledger.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        party = next(iter(ledger.parties()), None)
        if party is not None:
            spent.append(ledger.epsilon(party, ledger.delta(party)))
    if not spent:
        return None
    return {
        "devices": len(spent),
        "epsilon_max": max(spent),
        "epsilon_median": float(np.median(spent)),
    }


def privacy_disclosures(
    fed: FederatedConfig,
    audit: AuditConfig,
    history: list[dict[str, Any]],
    devices: Path | None = None,
) -> dict[str, Any]:
    """What the privacy report must say beyond the ledger: budgets, refusals, every release the
    ledger does not cover and, for simulated devices whose ledgers are in ``devices``, their
    lifetime ε."""
    uncovered: list[str] = []
    if not fed.private:
        uncovered.append(
            "No differential privacy is configured: every client sends its model update "
            "un-noised (federated.record_dp or federated.central_dp add it)."
        )
    if fed.reproducible_noise and fed.private:
        uncovered.append(
            "reproducible_noise is on: DP noise and sampling are seeded from the config, so "
            "anyone who knows the seed can regenerate and subtract the noise. No guarantee "
            "in this report holds against them."
        )
    if fed.central_dp is not None:
        uncovered.append(_server_view(fed))
    if fed.report_train_loss:
        uncovered.append("Clients send their training loss un-noised (report_train_loss).")
    if fed.private and fed.weighted:
        uncovered.append("Clients send their example count un-noised (weight_by_examples).")
    if fed.record_dp is not None:
        uncovered.append(
            "Each reply states its DP-SGD sampling rate and steps, which reveal "
            "⌈records / batch size⌉ of the client."
        )
    if audit.enabled and audit.mode == "federated":
        uncovered.append(
            "Federated audit: each client's group sums (its groups, its metrics, the rank of "
            "its test item) are sent un-noised"
            + ("" if audit.exposure_noise > 0 else ", and so is its top-K exposure histogram")
            + "; the item catalogue gives every client each item's training-interaction count "
            "over all users, un-noised."
        )
    return {
        "reproducible_noise": fed.reproducible_noise,
        "budgets": {
            "client_epsilon": fed.record_epsilon_budget,
            "federation_epsilon": fed.central_dp.target_epsilon if fed.central_dp else None,
        },
        "refused_client_rounds": int(sum(h.get("refused", 0) for h in history)),
        "not_covered": uncovered,
        "device_lifetime": device_lifetime(devices) if devices else None,
    }


def _server_view(fed: FederatedConfig) -> str:
    """What the server sees of the clients' updates under user-level DP."""
    secure = fed.secure_aggregation
    if secure is None:
        return (
            "User-level DP-FedAvg adds its noise on the server: the server itself sees each "
            "sampled client's clipped update un-noised (no secure aggregation), so that "
            "guarantee protects users from whoever sees the global model, not from the server."
        )
    if secure.noise == "central":
        return (
            "Secure aggregation (SecAgg+) hides each client's update from the server, but the "
            "DP noise is added after unmasking: the server sees the exact sum of the cohort's "
            "clipped updates, so the guarantee protects users from whoever sees the global "
            "model, not from the server."
        )
    return (
        "Secure aggregation (SecAgg+) with distributed noise: each client adds its share of "
        f"the noise and the server unmasks only sums of at least {fed.secure_min_contributors} "
        "updates, so the guarantee holds against the server too, with two limits: a client "
        "that colludes with the server can remove its own share, and the accounting treats "
        "the quantised (stochastically rounded) shares as Gaussian."
    )
