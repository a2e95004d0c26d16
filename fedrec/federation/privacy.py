"""Every privacy release of a federated round as a ledger event, ε so far, and what the report
must disclose beyond the ledger. Pure functions of the config sections: the client round, the
server round and the reports all call these, so the events are the same wherever recorded."""

from __future__ import annotations

import dataclasses
import functools
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
from fedrec.privacy.dp_sgd import DEFAULT_RECORD_DELTA, DPSGDConfig, plan_dp
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


def dp_statement_problem(fed: FederatedConfig, metrics: Mapping[str, object]) -> str:
    """What is wrong with a reply's statement of its DP-SGD release (``DP_METRICS``), or "".

    Everything but the record count follows from the config: the clip norm, δ, σ (fixed, or
    solved for ``target_epsilon`` at the stated q), q = 1 / batches and steps = local epochs ×
    batches. The count itself (so q) is the client's word: claiming more records than it holds
    would understate its ε, which no server can check."""
    dp = fed.record_dp
    if dp is None or not metrics.get("dp-steps"):
        return ""  # no record-level DP, or nothing released this round
    steps, rate = metrics.get("dp-steps"), metrics.get("dp-sample-rate")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return "dp-steps is not a non-negative integer"
    if not isinstance(rate, int | float) or not 0 < rate <= 1:
        return "dp-sample-rate is not in (0, 1]"
    batches = round(1 / rate)
    if not math.isclose(1 / batches, rate, rel_tol=1e-9):
        return f"dp-sample-rate {rate!r} is not 1 / a number of batches"
    if steps != fed.local_epochs * batches:
        return f"dp-steps {steps} is not local_epochs × batches ({fed.local_epochs * batches})"
    sigma = dp.noise_multiplier
    if sigma is None:
        assert dp.target_epsilon is not None
        epochs = fed.local_epochs * fed.num_rounds
        sigma = _solved_sigma(dp.target_epsilon, dp.delta, dp.accountant, batches, epochs)
    expected = {
        "dp-clip-norm": dp.max_grad_norm,
        "dp-delta": dp.delta,
        "dp-noise-multiplier": sigma,
    }
    for key, value in expected.items():
        stated = metrics.get(key)
        if not isinstance(stated, int | float) or not math.isclose(stated, value, rel_tol=1e-6):
            return f"{key} {stated!r} is not the federation's {value!r}"
    return ""


@functools.lru_cache(maxsize=256)
def _solved_sigma(
    target_epsilon: float, delta: float, accountant: str, batches: int, epochs: int
) -> float:
    """σ a client solves for ``target_epsilon`` with ``batches`` batches (``plan_dp``)."""
    solving = DPSGDConfig(
        target_epsilon=target_epsilon, delta=delta, accountant=accountant, batch_size=1
    )
    return plan_dp(batches, solving, epochs).noise_multiplier


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
        # Adaptive clipping: the update's and the clipped fraction's noise together cost the
        # ε of σ alone (Andrew et al. 2021, Thm 1); the norm varies, ε does not depend on it.
        note="adaptive clipping: update and clipped-count noise"
        if central.adaptive_clipping
        else "",
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


SERVER_VIEW = "server-view:"  # party prefix: a user's ε against the server itself


def server_view_event(
    fed: FederatedConfig, num_clients: int, partition: int, round_number: int
) -> PrivacyEvent:
    """What the server itself learns of a user whose update is in a SecAgg+ sum that carries
    distributed noise: it knows who took part, so sampling does not amplify; each such round
    is a Gaussian release of the round's σ (at least σC on the sum: it unmasks only sums of
    ``min_contributors`` shares; halved for the replace-one adjacency of fixed sampling)."""
    central = fed.central_dp
    assert central is not None
    sigma = central.noise_multiplier / (2 if central.sampling == "fixed" else 1)
    return PrivacyEvent(
        round=round_number,
        party=f"{SERVER_VIEW}{partition}",
        mechanism="gaussian",
        unit="user",
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        clip_norm=central.clipping_norm,
        delta=central.delta_for(num_clients),
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
    for prefix, key in (("client:", "client_max"), (SERVER_VIEW, "server_view_max")):
        parties = [p for p in ledger.parties() if p.startswith(prefix)]
        if parties:
            out[key] = max(ledger.epsilon(p, ledger.delta(p)) for p in parties)
            out[f"{key}_delta"] = max(ledger.delta(p) for p in parties)
    return out


def epsilon_text(spent: Mapping[str, float]) -> str:
    """``epsilons_so_far`` for a log line: every ε next to its δ."""
    parts = [
        f"{label} ε {spent[key]:.2f} (δ {spent[key + '_delta']:.1e})"
        for key, label in (
            ("federation", "federation"),
            ("client_max", "clients max"),
            ("server_view_max", "vs server max"),
        )
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
        "updates. Against the server, which knows who took part, sampling does not amplify: "
        "each user's ε against it is reported separately (server view, one Gaussian release "
        "per round the user joined). Limits: a client that colludes with the server can remove "
        "its own share and a hostile one can leave its share out, lowering the sum's noise; "
        "the accounting treats the quantised (stochastically rounded) shares as Gaussian; "
        "each reply's metrics (client id, refusal, DP-SGD statement) travel in the clear."
    )
