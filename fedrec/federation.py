"""What a federated run needs from the library: its config and one client's local training.

Flower itself lives in ``clients/`` and ``server/``; this module knows nothing of messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedrec.audits import AuditContext
from fedrec.data import prepare_split
from fedrec.data.batching import training_batch
from fedrec.data.dataset import InteractionDataset
from fedrec.data.membership import held_out, plant_canaries
from fedrec.data.partition import SCHEMES, partition_users
from fedrec.data.records import record_spans
from fedrec.data.split import SequenceSplit
from fedrec.evaluation.evaluator import Scorer
from fedrec.models import build_model
from fedrec.models.base import SequentialRecommender
from fedrec.privacy.accounting import WITHOUT_REPLACEMENT_ACCOUNTANT
from fedrec.privacy.dp_sgd import (
    DEFAULT_RECORD_DELTA,
    DPSGDConfig,
    DPTrainResult,
    dp_train,
    plan_dp,
)
from fedrec.privacy.ledger import PrivacyEvent, PrivacyLedger
from fedrec.training import model_scorer, train_epoch, trainable_users

if TYPE_CHECKING:
    from fedrec.config import ExperimentConfig

# Opacus calls logging.basicConfig at import, so every Flower line (Flower has its own console
# handler) would print twice through the root logger.
logging.getLogger("flwr").propagate = False
log = logging.getLogger("fedrec.federation")

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")
LOCAL_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


CLIENT_SAMPLINGS = ("poisson", "fixed")


@dataclass
class CentralDPConfig:
    """User-level DP-FedAvg: clients clip their update to ``clipping_norm`` (Flower's
    ``fixedclipping_mod``); the server adds N(0, (σ·C)²) to the sum of the clipped updates,
    divides by the expected cohort and only then applies the server optimizer (FedAdam, FedAvgM
    are post-processing).

    ``sampling``: ``poisson`` (default: each client joins a round independently with probability
    q = cohort / clients; add/remove-one adjacency, Opacus RDP) or ``fixed`` (exactly the cohort,
    drawn without replacement; replace-one adjacency, dp_accounting RDP). ``delta`` defaults to
    min(1e-5, clients^-1.1). The server stops before a round that would take the federation's
    ε past ``target_epsilon`` (the whole run's budget).
    """

    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float | None = None
    sampling: str = "poisson"

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clipping_norm <= 0:
            raise ValueError("central_dp: noise_multiplier >= 0 and clipping_norm > 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("central_dp.target_epsilon must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("central_dp.delta must lie in (0, 1)")
        if self.sampling not in CLIENT_SAMPLINGS:
            raise ValueError(
                f"central_dp.sampling must be one of {CLIENT_SAMPLINGS}, got {self.sampling!r}"
            )

    def delta_for(self, num_clients: int) -> float:
        """δ of the federation's guarantee: the setting, else min(1e-5, clients^-1.1)."""
        return self.delta if self.delta is not None else min(1e-5, num_clients**-1.1)


@dataclass
class FederatedConfig:
    """A federated run. ``partitioning``: ``user`` (one client per user), ``hash`` or
    ``attribute`` (silos). Sampling: ``clients_per_round``, or ``fraction_per_round`` > 0. ``record_dp``: Opacus DP-SGD on every client (records are windows
    of ``record_window`` events for one-user clients, whole user sequences for silos), with
    ``record_epsilon_budget`` per client. ``central_dp``: user-level DP-FedAvg.
    ``local_optimizer``: ``adam`` (a fresh Adam every round) or ``sgd`` (with one local epoch
    the update is the client's gradient scaled by ``local_learning_rate``: FedSGD, which a
    server optimizer such as FedAdam turns into large-batch centralized Adam).
    ``server_tau``: FedAdam's adaptivity τ (Flower's default 1e-3 dominates √v_t when client
    updates are small, reducing FedAdam to plain server SGD). ``eval_every``: the server
    evaluates the global model every N rounds and after the last (1: every round, and once
    before training).

    Records for one-user clients: each calendar period of ``record_period`` seconds (UTC; one
    day by default) of a user's training events is one record, cut to its first
    ``record_window + 1`` events, so removing any one event changes exactly one record.
    Releases: ``reproducible_noise`` seeds DP noise and DP sampling from ``seed`` (simulation
    only; no guarantee against anyone who knows the seed); ``report_train_loss`` sends each
    client's un-noised loss; ``weight_by_examples`` weights FedAvg by the client's un-noised
    example count (default: only without DP). Both are outside the ledger and warned about."""

    partitioning: str = "user"
    num_partitions: int = 0
    partition_attribute: str = ""
    num_rounds: int = 5
    clients_per_round: int = 10
    fraction_per_round: float = 0.0
    local_epochs: int = 1
    local_learning_rate: float = 1e-3
    local_batch_size: int = 32
    local_optimizer: str = "adam"
    strategy: str = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    server_tau: float = 1e-3
    proximal_mu: float = 0.0
    round_timeout: float = 600.0
    eval_every: int = 1
    record_window: int = 20
    record_period: int = 86400
    reproducible_noise: bool = False
    report_train_loss: bool = False
    weight_by_examples: bool | None = None
    record_dp: DPSGDConfig | None = None
    record_epsilon_budget: float | None = None
    central_dp: CentralDPConfig | None = None

    def __post_init__(self) -> None:
        if self.partitioning not in SCHEMES:
            raise ValueError(f"federated.partitioning must be one of {SCHEMES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"federated.strategy must be one of {STRATEGIES}, got {self.strategy!r}"
            )
        if (
            min(self.num_rounds, self.clients_per_round, self.local_epochs, self.local_batch_size)
            < 1
        ):
            raise ValueError(
                "federated: num_rounds, clients_per_round, local_epochs, local_batch_size >= 1"
            )
        if self.local_learning_rate <= 0 or self.round_timeout <= 0 or self.record_window < 1:
            raise ValueError("federated: local_learning_rate, round_timeout, record_window > 0")
        if self.eval_every < 1:
            raise ValueError("federated.eval_every must be >= 1")
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(
                f"federated.local_optimizer must be one of {sorted(LOCAL_OPTIMIZERS)}, "
                f"got {self.local_optimizer!r}"
            )
        if self.server_tau <= 0:
            raise ValueError("federated.server_tau must be > 0")
        if not 0 <= self.fraction_per_round <= 1:
            raise ValueError("federated.fraction_per_round must lie in [0, 1] (0: use the count)")
        if self.record_epsilon_budget is not None and self.record_dp is None:
            raise ValueError("federated.record_epsilon_budget needs federated.record_dp")
        if self.record_period < 1:
            raise ValueError("federated.record_period must be >= 1 (seconds)")
        private = self.record_dp is not None or self.central_dp is not None
        for option, enabled in (
            ("report_train_loss", self.report_train_loss),
            ("weight_by_examples", private and self.weight_by_examples),
        ):
            if private and enabled:
                log.warning(
                    "federated.%s: clients send this un-noised; it is not in the privacy "
                    "ledger and the privacy report lists it as not covered",
                    option,
                )
        if self.central_dp is not None and self.weight_by_examples:
            raise ValueError(
                "federated.weight_by_examples cannot be used with central_dp: the noise is "
                "calibrated to an unweighted sum of clipped updates (set it to false)"
            )

    @property
    def private(self) -> bool:
        return self.record_dp is not None or self.central_dp is not None

    @property
    def weighted(self) -> bool:
        """Whether clients report their example count as the aggregation weight."""
        return not self.private if self.weight_by_examples is None else self.weight_by_examples

    def sampled_clients(self, num_clients: int) -> int:
        """Clients per round: ``fraction_per_round`` of them when set, else the count."""
        if self.fraction_per_round > 0:
            return max(1, round(self.fraction_per_round * num_clients))
        return min(self.clients_per_round, num_clients)

    @property
    def protected_unit(self) -> str:
        """What one record-level DP record is: a day of a user, or a user inside a silo."""
        return "user-day" if self.partitioning == "user" else "user-within-silo"


def event_windows(
    split: SequenceSplit, users: np.ndarray, window: int, period: int = 86400
) -> TensorDataset:
    """The records of each user's training history (``record_spans``), one example each:
    record-level DP-SGD then protects a user's day, and so any one of its events."""
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for user in users:
        lo, end = int(split.offsets[user]), int(split.offsets[user + 1]) - 2  # training part
        for start, stop in record_spans(split.timestamps[lo:end], window, period):
            items = split.items[lo + start : lo + stop] + 1
            times = split.timestamps[lo + start : lo + stop]
            pad = window - (len(items) - 1)
            rows.append(
                (
                    np.concatenate([np.zeros(pad, np.int64), items[:-1]]),
                    np.concatenate([np.zeros(pad, np.int64), times[:-1].astype(np.int64)]),
                    np.concatenate([np.zeros(pad, np.int64), items[1:]]),
                )
            )
    if not rows:  # no day with two events: no record (TensorDataset() has no length)
        return TensorDataset(*(torch.zeros((0, window), dtype=torch.int64) for _ in range(3)))
    return TensorDataset(*(torch.from_numpy(np.stack(c)) for c in zip(*rows, strict=True)))


def dp_records(
    split: SequenceSplit, users: np.ndarray, config: FederatedConfig, max_len: int
) -> TensorDataset:
    """The records of record-level DP-SGD: a user's days (one-user clients) or whole users."""
    if config.partitioning == "user":
        return event_windows(split, users, config.record_window, config.record_period)
    return TensorDataset(*training_batch(split, users, max_len))


@dataclass
class LocalResult:
    num_examples: int
    loss: float
    dp: DPTrainResult | None


def local_train(
    model: SequentialRecommender,
    split: SequenceSplit,
    config: FederatedConfig,
    seed: int,
    noise_seed: int | None = None,
) -> LocalResult:
    """Train ``model`` in place on one client's sequences (all of ``split``). ``seed`` drives
    dropout and negatives; DP noise is private unless ``noise_seed`` (reproducible mode)."""
    users = trainable_users(split)
    if not len(users):
        return LocalResult(0, math.nan, None)
    torch.manual_seed(seed)
    if config.record_dp is not None:
        examples = dp_records(split, users, config, model.config.max_len)
        if not len(examples):
            return LocalResult(0, math.nan, None)
        optimizer = LOCAL_OPTIMIZERS[config.local_optimizer](
            model.parameters(), lr=config.local_learning_rate
        )
        result = dp_train(
            model,
            examples,
            config.record_dp,
            config.local_epochs,
            config.local_learning_rate,
            optimizer=optimizer,
            noise_seed=noise_seed,
            rounds=config.num_rounds,
        )
        return LocalResult(len(examples), result.mean_loss, result)
    optimizer = LOCAL_OPTIMIZERS[config.local_optimizer](
        model.parameters(), lr=config.local_learning_rate
    )
    rng = np.random.default_rng(seed)
    losses = [
        train_epoch(
            model, optimizer, split, users, config.local_batch_size, rng, torch.device("cpu")
        )
        for _ in range(config.local_epochs)
    ]
    positions = int(np.maximum(split.history_lengths("valid")[users] - 1, 0).sum())
    return LocalResult(positions, float(np.mean(losses)), None)


class FederatedModel(Protocol):
    """What a federation trains. ``shared_state`` names every tensor that crosses the network
    (the whole sequential model, or only the LLM recommender's adapters); personal state (a
    user's own prompt) is kept in the client's ``personal`` file and never in it."""

    def shared_state(self) -> dict[str, torch.Tensor]: ...

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def to(self, device: torch.device) -> FederatedModel: ...

    def scorer(self, split: SequenceSplit, device: torch.device) -> Scorer: ...

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: Path | None,
        noise_seed: int | None = None,
    ) -> LocalResult: ...

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int: ...

    def export(self, folder: Path) -> None: ...


class SequentialFederatedModel:
    """A sequential recommender (HSTU, SASRec) trained whole by the federation."""

    def __init__(self, model: SequentialRecommender):
        self.model = model

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def to(self, device: torch.device) -> SequentialFederatedModel:
        self.model.to(device)
        return self

    def scorer(self, split: SequenceSplit, device: torch.device) -> Scorer:
        return model_scorer(self.model, split, device)

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: Path | None,
        noise_seed: int | None = None,
    ) -> LocalResult:
        return local_train(self.model, split, fed, seed, noise_seed)

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int:
        return len(dp_records(split, trainable_users(split), fed, self.model.config.max_len))

    def export(self, folder: Path) -> None:
        torch.save(self.model.state_dict(), folder / "model.pt")


def build_federated_model(
    population: Population, run_dir: Path, cached: bool = False
) -> FederatedModel:
    """The run's model: the LLM recommender when the config has an ``llm`` section (its
    foundation must exist: ``fedrec.llm_rec.federated.ensure_foundation``), else ``model``.
    ``cached``: reuse this process' LLM backbone (clients)."""
    config = population.config
    if config.llm is not None:
        from fedrec.llm_rec.federated import llm_federated_model

        return llm_federated_model(population, run_dir, cached)
    return SequentialFederatedModel(
        build_model(config.model_name, population.split.num_items, config.model)
    )


def client_seed(seed: int, round_number: int, partition: int, stream: int = 0) -> int:
    """The torch/numpy seed of one client's local training in one round (dropout, negatives);
    ``stream`` 1 is its DP noise in the reproducible mode. Distinct for every (seed, round,
    partition, stream): a linear formula would give two clients of two rounds one stream."""
    state = np.random.SeedSequence([seed, round_number, partition, stream]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1


def noise_seed(fed: FederatedConfig, seed: int, round_number: int, partition: int) -> int | None:
    """The seed of a client's DP noise: None (private, from OS entropy) unless the config asks
    for ``reproducible_noise``."""
    if not fed.reproducible_noise:
        return None
    return client_seed(seed, round_number, partition, stream=1)


def reply_weight(result: LocalResult, config: FederatedConfig) -> int:
    """``num-examples`` a client reports: its training positions when the federation weights by
    examples, else 1 (any DP run by default: the count is the client's data, un-noised, and
    DP-FedAvg's noise is calibrated to an unweighted sum); 0 when it did not train."""
    if result.num_examples == 0:
        return 0
    return result.num_examples if config.weighted else 1


def planned_record_event(
    fed: FederatedConfig, records: int, partition: int, round_: int
) -> PrivacyEvent | None:
    """The record-level DP release client ``partition`` would make this round on ``records``
    records, known before it trains (for its budget check); None without DP or records."""
    if fed.record_dp is None or records == 0:
        return None
    plan = plan_dp(records, fed.record_dp, fed.local_epochs, fed.num_rounds)
    return PrivacyEvent(
        round=round_,
        party=f"client:{partition}",
        mechanism="dp-sgd",
        unit=fed.protected_unit,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        clip_norm=fed.record_dp.max_grad_norm,
        delta=plan.delta,
        accountant=fed.record_dp.accountant,
    )


def central_event(fed: FederatedConfig, num_clients: int, round_number: int) -> PrivacyEvent:
    """The server's user-level DP release of one round (``server.dp.UserLevelDP``)."""
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


def exposure_event(config: ExperimentConfig, partition: int, round_number: int) -> PrivacyEvent:
    """A client's noised top-K exposure histogram (the federated audit) as a ledger event.

    One user's top-K list is a K-hot vector; any change to the user's data can swap it for
    another K-hot vector, an L2 change of at most √(2K): the Gaussian's multiplier is σ / √(2K),
    a guarantee for the client's whole data and so for each of its records.
    """
    fed, audit = config.federated, config.audit
    sensitivity = math.sqrt(2 * audit.k)
    return PrivacyEvent(
        round=round_number,
        party=f"client:{partition}",
        mechanism="gaussian",
        unit=fed.protected_unit if fed.record_dp is not None else "user",
        noise_multiplier=audit.exposure_noise / sensitivity,
        sample_rate=1.0,
        steps=1,
        clip_norm=sensitivity,
        delta=fed.record_dp.delta if fed.record_dp is not None else DEFAULT_RECORD_DELTA,
        note="audit exposure histogram",
        accountant=fed.record_dp.accountant if fed.record_dp is not None else "rdp",
    )


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
    config: ExperimentConfig, history: list[dict[str, Any]], run_dir: Path | None = None
) -> dict[str, Any]:
    """What the privacy report must say beyond the ledger: budgets, refusals, every release the
    ledger does not cover and, for simulated devices in ``run_dir``, their lifetime ε."""
    fed, audit = config.federated, config.audit
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
        uncovered.append(
            "User-level DP-FedAvg adds its noise on the server: the server itself sees each "
            "sampled client's clipped update un-noised (no secure aggregation), so that "
            "guarantee protects users from whoever sees the global model, not from the server."
        )
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
            + ("." if audit.exposure_noise > 0 else ", and so is its top-K exposure histogram.")
        )
    return {
        "reproducible_noise": fed.reproducible_noise,
        "budgets": {
            "client_epsilon": fed.record_epsilon_budget,
            "federation_epsilon": fed.central_dp.target_epsilon if fed.central_dp else None,
        },
        "refused_client_rounds": int(sum(h.get("refused", 0) for h in history)),
        "not_covered": uncovered,
        "device_lifetime": device_lifetime(run_dir / DEVICE_DIR) if run_dir else None,
    }


CONFIG_ENV = "FEDREC_CONFIG"
RUN_DIR_ENV = "FEDREC_RUN_DIR"
# A simulated device's files live in the run folder: its ledger in DEVICE_DIR, which fedrec
# never deletes (ε belongs to the user and outlives runs); its personal prompt, which belongs
# to the run's model, in CLIENT_STATE_DIR (cleared on a fresh run).
DEVICE_DIR = "devices"
CLIENT_STATE_DIR = "client-state"


def resolve_run_dir(run_config: Mapping[str, Any], default: str) -> Path:
    """The run folder: ``run-dir`` of the run config, else ``$FEDREC_RUN_DIR``, else ``default``."""
    return Path(str(run_config.get("run-dir", "") or os.environ.get(RUN_DIR_ENV, "") or default))


def client_ledger_path(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], default_run_dir: str
) -> Path:
    """Where a client keeps its privacy ledger, so ε survives restarts and resumed runs.

    A device names its own folder with the node config's ``ledger-dir``; simulated clients
    share the run folder's ``devices/`` (one file each, by partition), never deleted by fedrec.
    """
    partition = int(node_config["partition-id"])
    folder = node_config.get("ledger-dir") or resolve_run_dir(run_config, default_run_dir) / (
        DEVICE_DIR
    )
    return Path(str(folder)) / f"client-{partition}.json"


def client_personal_path(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], default_run_dir: str
) -> Path:
    """Where a client keeps its personal prompt: next to its ledger on a device, in the run's
    ``client-state/`` in simulation."""
    partition = int(node_config["partition-id"])
    folder = node_config.get("ledger-dir") or resolve_run_dir(run_config, default_run_dir) / (
        CLIENT_STATE_DIR
    )
    return Path(str(folder)) / f"client-{partition}-personal.safetensors"


def resolve_config_path(run_config: Mapping[str, Any]) -> str:
    """The experiment YAML of a Flower run: ``config`` of the run config (``flwr run``), else
    ``$FEDREC_CONFIG`` (set by ``fedrec simulate``, whose apps get an empty run config)."""
    path = str(run_config.get("config", "") or os.environ.get(CONFIG_ENV, ""))
    if not path:
        raise ValueError(
            f"no experiment config: set `config` in [tool.flwr.app.config] or ${CONFIG_ENV}"
        )
    return path


@dataclass
class Population:
    """Everything a process of a simulated federation derives from the config alone."""

    config: ExperimentConfig
    dataset: InteractionDataset
    split: SequenceSplit
    partitions: list[np.ndarray]

    def client_split(self, partition_id: int) -> SequenceSplit:
        """Partition ``partition_id``'s sequences, and nothing of any other client."""
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id {partition_id} outside 0..{len(self.partitions) - 1}: the "
                "federation has more supernodes than the config has partitions"
            )
        return self.split.subset(self.partitions[partition_id])

    @functools.cached_property
    def audit_context(self) -> AuditContext:
        """Group labels, item popularity and genres of the whole population (the server's
        audit; clients slice it with ``AuditContext.for_users``)."""
        return AuditContext.build(self.dataset, self.split, self.config.audit)

    def client_audit_context(self, partition_id: int) -> AuditContext:
        return self.audit_context.for_users(
            self.partitions[partition_id], self.client_split(partition_id)
        )


def population_of(config: ExperimentConfig) -> Population:
    """The data and partition of a federated run's config; users held out for the privacy
    audit have no client, and canaries are planted (``fedrec.data.membership``)."""
    dataset, split = prepare_split(config.data)
    fed, audit = config.federated, config.privacy_audit
    partitions = partition_users(
        dataset, fed.partitioning, fed.num_partitions, fed.partition_attribute
    )
    if audit.enabled:
        split = plant_canaries(split, audit, config.seed)
        outside = held_out(split.num_users, audit, config.seed)
        partitions = [p[~outside[p]] for p in partitions if (~outside[p]).any()]
    return Population(config, dataset, split, partitions)


@functools.lru_cache(maxsize=2)
def load_population(config_path: str) -> Population:
    """Load (once per process) the data and partition of a federated run."""
    from fedrec.config import load_config

    return population_of(load_config(config_path))
