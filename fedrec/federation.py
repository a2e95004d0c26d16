"""What a federated run needs from the library: its config and one client's local training.

Flower itself lives in ``clients/`` and ``server/``; this module knows nothing of messages.
"""

from __future__ import annotations

import functools
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
from fedrec.data.partition import SCHEMES, partition_users
from fedrec.data.split import SequenceSplit
from fedrec.evaluation.evaluator import Scorer
from fedrec.models import build_model
from fedrec.models.base import SequentialRecommender
from fedrec.privacy.dp_sgd import DPSGDConfig, DPTrainResult, dp_train, plan_dp
from fedrec.privacy.ledger import PrivacyEvent
from fedrec.training import model_scorer, train_epoch, trainable_users

if TYPE_CHECKING:
    from fedrec.config import ExperimentConfig

# Opacus calls logging.basicConfig at import, so every Flower line (Flower has its own console
# handler) would print twice through the root logger.
logging.getLogger("flwr").propagate = False

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")
LOCAL_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class CentralDPConfig:
    """User-level DP-FedAvg: Flower's client-side fixed clipping plus server noise σ·C/n.

    The server stops once the federation's ε at ``delta`` (default 1 / (10 · clients)) would
    exceed ``target_epsilon``.
    """

    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clipping_norm <= 0:
            raise ValueError("central_dp: noise_multiplier >= 0 and clipping_norm > 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("central_dp.target_epsilon must be > 0")


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
    before training)."""

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

    def sampled_clients(self, num_clients: int) -> int:
        """Clients per round: ``fraction_per_round`` of them when set, else the count."""
        if self.fraction_per_round > 0:
            return max(1, round(self.fraction_per_round * num_clients))
        return min(self.clients_per_round, num_clients)

    @property
    def protected_unit(self) -> str:
        """What one record-level DP record is: an event of a user, or a user inside a silo."""
        return "event" if self.partitioning == "user" else "user-within-silo"


def event_windows(split: SequenceSplit, users: np.ndarray, window: int) -> TensorDataset:
    """Disjoint chunks of ``window + 1`` events of each user's training history, one record each.

    Every event lies in exactly one record (the transition between two chunks is not trained),
    so clipping per record bounds the influence of one event: event-level DP.
    """
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for user in users:
        lo, end = int(split.offsets[user]), int(split.offsets[user + 1]) - 2  # training part
        for start in range(lo, end - 1, window + 1):
            items = split.items[start : min(start + window + 1, end)] + 1
            times = split.timestamps[start : min(start + window + 1, end)]
            pad = window - (len(items) - 1)
            rows.append(
                (
                    np.concatenate([np.zeros(pad, np.int64), items[:-1]]),
                    np.concatenate([np.zeros(pad, np.int64), times[:-1].astype(np.int64)]),
                    np.concatenate([np.zeros(pad, np.int64), items[1:]]),
                )
            )
    return TensorDataset(*(torch.from_numpy(np.stack(c)) for c in zip(*rows, strict=True)))


@dataclass
class LocalResult:
    num_examples: int
    loss: float
    dp: DPTrainResult | None


def local_train(
    model: SequentialRecommender, split: SequenceSplit, config: FederatedConfig, seed: int
) -> LocalResult:
    """Train ``model`` in place on one client's sequences (all of ``split``)."""
    users = trainable_users(split)
    if not len(users):
        return LocalResult(0, math.nan, None)
    torch.manual_seed(seed)
    if config.record_dp is not None:
        examples = (
            event_windows(split, users, config.record_window)
            if config.partitioning == "user"
            else TensorDataset(*training_batch(split, users, model.config.max_len))
        )
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
        self, split: SequenceSplit, fed: FederatedConfig, seed: int, personal: Path | None
    ) -> LocalResult: ...

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
        self, split: SequenceSplit, fed: FederatedConfig, seed: int, personal: Path | None
    ) -> LocalResult:
        return local_train(self.model, split, fed, seed)

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


def client_seed(seed: int, round_number: int, partition: int) -> int:
    """The torch/numpy seed of one client's local training in one round."""
    return seed * 1_000_003 + round_number * 7919 + partition


def reply_weight(result: LocalResult, config: FederatedConfig) -> int:
    """``num-examples`` a client reports: 1 under DP-FedAvg, whose noise σ·C/n is calibrated
    for an unweighted mean of the clipped updates; otherwise its training positions."""
    return 1 if config.central_dp is not None else result.num_examples


def planned_record_event(
    fed: FederatedConfig, split: SequenceSplit, partition: int, round_: int
) -> tuple[PrivacyEvent, float] | None:
    """The record-level DP release (and its δ) client ``partition`` would make this round, known
    before it trains (for its budget check), or None without record-level DP or data."""
    if fed.record_dp is None:
        return None
    users = trainable_users(split)
    if not len(users):
        return None
    records = (
        len(event_windows(split, users, fed.record_window))
        if fed.partitioning == "user"
        else len(users)
    )
    plan = plan_dp(records, fed.record_dp, fed.local_epochs)
    event = PrivacyEvent(
        round=round_,
        party=f"client:{partition}",
        mechanism="dp-sgd",
        unit=fed.protected_unit,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        clip_norm=fed.record_dp.max_grad_norm,
        delta=plan.delta,
    )
    return event, plan.delta


CONFIG_ENV = "FEDREC_CONFIG"
RUN_DIR_ENV = "FEDREC_RUN_DIR"
CLIENT_LEDGER_DIR = "client-ledgers"


def resolve_run_dir(run_config: Mapping[str, Any], default: str) -> Path:
    """The run folder: ``run-dir`` of the run config, else ``$FEDREC_RUN_DIR``, else ``default``."""
    return Path(str(run_config.get("run-dir", "") or os.environ.get(RUN_DIR_ENV, "") or default))


def client_ledger_path(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], default_run_dir: str
) -> Path:
    """Where a client keeps its privacy ledger, so ε survives restarts and resumed runs.

    A device names its own folder with the node config's ``ledger-dir``; simulated clients
    share the run folder's ``client-ledgers/`` (one file each, by partition).
    """
    partition = int(node_config["partition-id"])
    return _client_folder(run_config, node_config, default_run_dir) / f"client-{partition}.json"


def client_personal_path(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], default_run_dir: str
) -> Path:
    """Where a client keeps its personal prompt: next to its ledger, on the device."""
    partition = int(node_config["partition-id"])
    folder = _client_folder(run_config, node_config, default_run_dir)
    return folder / f"client-{partition}-personal.safetensors"


def _client_folder(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], default_run_dir: str
) -> Path:
    folder = node_config.get("ledger-dir") or resolve_run_dir(run_config, default_run_dir) / (
        CLIENT_LEDGER_DIR
    )
    return Path(str(folder))


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
    """The data and partition of a federated run's config."""
    dataset, split = prepare_split(config.data)
    fed = config.federated
    partitions = partition_users(
        dataset, fed.partitioning, fed.num_partitions, fed.partition_attribute
    )
    return Population(config, dataset, split, partitions)


@functools.lru_cache(maxsize=2)
def load_population(config_path: str) -> Population:
    """Load (once per process) the data and partition of a federated run."""
    from fedrec.config import load_config

    return population_of(load_config(config_path))
