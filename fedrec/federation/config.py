"""The federated section of an experiment: sampling, local training, the server strategy, DP.

A leaf: it names strategies and partitioners by their registries' keys and is read by the
federation core, the Flower apps and the in-process loop, none of which it knows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedrec.data.partition import PARTITIONERS
from fedrec.federation.strategies import STRATEGIES
from fedrec.privacy.dp_sgd import DPSGDConfig

log = logging.getLogger("fedrec.federation")

LOCAL_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
CLIENT_SAMPLINGS = ("poisson", "fixed")
SECURE_NOISE = ("distributed", "central")


@dataclass
class AdaptiveClippingConfig:
    """Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
    clipping"): after each round the clipping norm moves geometrically towards the
    ``target_quantile`` of the round's update norms, C ← C·exp(−``learning_rate``·(b̄ − γ)),
    where b̄ is the noised fraction of updates within C. The fraction is a DP release too
    (noise ``count_stddev``, default expected cohort / 20); the update's noise rises so that
    both together cost exactly the ε of ``noise_multiplier`` alone (the paper's Theorem 1),
    which is what the ledger books. ``clipping_norm`` is the first round's C."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1 or self.learning_rate <= 0:
            raise ValueError(
                "central_dp.adaptive_clipping: target_quantile in (0, 1), learning_rate > 0"
            )
        if self.count_stddev is not None and self.count_stddev <= 0:
            raise ValueError("central_dp.adaptive_clipping.count_stddev must be > 0")


def clipped_count_stddev(central: CentralDPConfig, cohort: float) -> float:
    """σ_b of adaptive clipping's count: the setting, else expected cohort / 20 (the paper's
    and Flower's default)."""
    adaptive = central.adaptive_clipping
    assert adaptive is not None
    return adaptive.count_stddev if adaptive.count_stddev is not None else cohort / 20


@dataclass
class CentralDPConfig:
    """User-level DP-FedAvg: clients clip their update to ``clipping_norm``; the server adds
    N(0, (σ·C)²) to the sum of the clipped updates, divides by the expected cohort and only then
    applies the server optimizer (FedAdam, FedAvgM are post-processing).

    ``sampling``: ``poisson`` (default: each client joins a round independently with probability
    q = cohort / clients; add/remove-one adjacency, Opacus RDP) or ``fixed`` (exactly the cohort,
    drawn without replacement; replace-one adjacency, dp_accounting RDP). ``delta`` defaults to
    min(1e-5, clients^-1.1). The server stops before a round that would take the federation's
    ε past ``target_epsilon`` (the whole run's budget). ``adaptive_clipping``: the clipping norm
    follows a quantile of the update norms (``AdaptiveClippingConfig``).
    """

    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float | None = None
    sampling: str = "poisson"
    adaptive_clipping: AdaptiveClippingConfig | None = None

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
        if self.adaptive_clipping is not None and self.sampling != "poisson":
            raise ValueError(
                "central_dp.adaptive_clipping is accounted for Poisson sampling (add/remove-one "
                "adjacency, the paper's): set central_dp.sampling: poisson"
            )
        if self.adaptive_clipping is not None and self.noise_multiplier == 0:
            raise ValueError(
                "central_dp.adaptive_clipping needs noise_multiplier > 0 (un-noised, the norm "
                "it learns would be a release without DP)"
            )

    def delta_for(self, num_clients: int) -> float:
        """δ of the federation's guarantee: the setting, else min(1e-5, clients^-1.1)."""
        return self.delta if self.delta is not None else min(1e-5, num_clients**-1.1)


@dataclass
class SecureAggregationConfig:
    """SecAgg+ (Bell et al. 2020, Flower's ``SecAggPlusWorkflow``): the server learns only the
    sum of the cohort's clipped updates. Each client shares its masking secrets with
    ``num_shares`` neighbours (a fraction of the round's cohort, default 1.0: all of it; or an
    odd count ≥ 3, as SecAgg+ does for large cohorts: Flower silently adds one to an even count
    after telling the clients, and every client then fails). Any ``reconstruction_threshold``
    of them (a fraction of the shares, or a count; more than half, so the server can never
    hold both secrets of one client) remove the masks of a client that dropped out: a round
    survives while every client keeps that many neighbours, so the default full graph with
    0.6 tolerates 40 % dropping out, and a sparse graph much less (BENCHMARKS.md).

    ``noise``: ``distributed`` (default) — every client adds N(0, (σC)²/m) to its masked
    update, m = ``min_contributors``, and the server unmasks only when at least m masked
    updates arrived, so the sum carries at least the N(0, (σC)²) of DP-FedAvg and not even the
    server sees it un-noised; or ``central`` — the server adds N(0, (σC)²) after unmasking, so
    the guarantee holds against whoever sees the model, but the server sees the exact sum.
    ``min_contributors`` unset: half of ``clients_per_round`` (required with
    ``fraction_per_round``)."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.6
    noise: str = "distributed"
    min_contributors: int | None = None

    def __post_init__(self) -> None:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and (shares < 3 or shares % 2 == 0):
            raise ValueError(
                f"secure_aggregation.num_shares must be odd and >= 3, got {shares}: with an "
                "even count Flower's SecAgg+ clients fail and the model never moves (use "
                f"{max(3, shares + 1)}, or 1.0 for the whole cohort)"
            )
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError(
                "secure_aggregation.num_shares as a fraction of the cohort must lie in (0, 1]"
            )
        if isinstance(threshold, float) and not 0.5 < threshold <= 1:
            raise ValueError(
                "secure_aggregation.reconstruction_threshold as a fraction must be more than "
                "half (0.5, 1]: at half or less the server could rebuild both secrets of a "
                "client and unmask its update"
            )
        if isinstance(threshold, int):
            if not isinstance(shares, int):
                raise ValueError(
                    "secure_aggregation.reconstruction_threshold must be a fraction (e.g. 0.6) "
                    "when num_shares is one"
                )
            if not shares // 2 < threshold < shares:
                raise ValueError(
                    "secure_aggregation.reconstruction_threshold must be more than half of "
                    f"num_shares and less than it (here {shares // 2 + 1}..{shares - 1}): at "
                    "half or less the server could rebuild both secrets of a client and unmask "
                    "its update"
                )
        if self.noise not in SECURE_NOISE:
            raise ValueError(
                f"secure_aggregation.noise must be one of {SECURE_NOISE}, got {self.noise!r}"
            )
        if self.min_contributors is not None and self.min_contributors < 3:
            raise ValueError(
                "secure_aggregation.min_contributors must be >= 3: a sum of two updates shows "
                "each to the other client, and Flower seeds each pairwise mask with 32 bits, so "
                "a client masked by one neighbour alone could be unmasked by search"
            )


@dataclass
class FederatedConfig:
    """A federated run. ``partitioning``: a registered partitioner (``user``: one client per
    user; ``hash`` or ``attribute``: silos). Sampling: ``clients_per_round``, or
    ``fraction_per_round`` > 0. ``record_dp``: Opacus DP-SGD on every client (what one record is:
    ``fedrec.federation.records``), with ``record_epsilon_budget`` per client. ``central_dp``:
    user-level DP-FedAvg. ``strategy``: a registered server strategy
    (``fedrec.federation.strategies``): ``fedavg``, ``fedavgm``, ``fedprox``, ``fedadam``, or a
    robust rule, ``krum``, ``multikrum`` (``krum_select`` updates kept), ``bulyan`` (these
    assume ``malicious_clients`` hostile replies per round), ``trimmedmean`` (``trim_beta``
    cut at each end) or ``median``. ``local_optimizer``: ``adam`` (a fresh Adam every round)
    or ``sgd`` (with one local epoch the update is the client's gradient scaled by
    ``local_learning_rate``: FedSGD, which a server optimizer such as FedAdam turns into
    large-batch centralized Adam). ``server_tau``: FedAdam's adaptivity τ (Flower's default 1e-3
    dominates √v_t when client updates are small, reducing FedAdam to plain server SGD).
    ``eval_every``: the server evaluates the global model every N rounds and after the last (1:
    every round, and once before training).

    Records for one-user clients: each calendar period of ``record_period`` seconds (UTC; one
    day by default) of a user's training events is one record, cut to its first
    ``record_window + 1`` events, so removing any one event changes exactly one record.
    Releases: ``reproducible_noise`` seeds DP noise and DP sampling from ``seed`` (simulation
    only; no guarantee against anyone who knows the seed); ``report_train_loss`` sends each
    client's un-noised loss; ``weight_by_examples`` weights FedAvg by the client's un-noised
    example count (default: only without DP). Both are outside the ledger and warned about.

    ``users_per_node`` > 1 simulates with cohort nodes (``fedrec.federation.cohort``): each
    node hosts that many clients and runs every sampled one's round in one message.

    Replies are validated before aggregation (``server.validation``): without user-level DP an
    update whose L2 norm exceeds ``max_update_norm`` (unset: 10× the round's median) is left
    out, and a client's weight is capped at ``max_client_weight`` (unset: 10× the round's
    median)."""

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
    malicious_clients: int = 0
    krum_select: int = 1
    trim_beta: float = 0.2
    round_timeout: float = 600.0
    eval_every: int = 1
    record_window: int = 20
    record_period: int = 86400
    reproducible_noise: bool = False
    report_train_loss: bool = False
    weight_by_examples: bool | None = None
    max_update_norm: float | None = None
    max_client_weight: int | None = None
    users_per_node: int = 1
    record_dp: DPSGDConfig | None = None
    record_epsilon_budget: float | None = None
    central_dp: CentralDPConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None

    def __post_init__(self) -> None:
        if self.partitioning not in PARTITIONERS:
            raise ValueError(
                f"federated.partitioning must be one of {sorted(PARTITIONERS)}, "
                f"got {self.partitioning!r}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"federated.strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.secure_aggregation is not None:
            self._check_secure_aggregation(self.secure_aggregation)
        if self.users_per_node < 1:
            raise ValueError("federated.users_per_node must be >= 1 (1: one node per client)")
        if self.users_per_node > 1 and self.secure_aggregation is not None:
            raise ValueError(
                "federated.users_per_node > 1 (cohort nodes) runs every hosted client's round "
                "in one message; SecAgg+ needs each client's own protocol messages: set "
                "users_per_node: 1"
            )
        if self.central_dp is not None and self.central_dp.adaptive_clipping is not None:
            if self.secure_aggregation is not None:
                raise ValueError(
                    "central_dp.adaptive_clipping needs each update's norm, which SecAgg+ hides "
                    "from the server: drop one of them"
                )
            count = clipped_count_stddev(self.central_dp, self.clients_per_round)
            if self.central_dp.noise_multiplier >= 2 * count:
                raise ValueError(
                    f"central_dp.adaptive_clipping: the count's noise σ_b {count:g} must exceed "
                    f"half of noise_multiplier {self.central_dp.noise_multiplier:g}; set "
                    f"count_stddev above {self.central_dp.noise_multiplier / 2:g} (default: "
                    "clients_per_round / 20)"
                )
        if STRATEGIES[self.strategy].robust and self.central_dp is not None:
            raise ValueError(
                f"federated.strategy {self.strategy!r} aggregates the individual updates, but "
                "under central_dp the strategy receives only their noised mean: choose fedavg, "
                "fedavgm, fedprox or fedadam, or drop central_dp"
            )
        if self.malicious_clients < 0 or self.krum_select < 1 or not 0 <= self.trim_beta < 0.5:
            raise ValueError(
                "federated: malicious_clients >= 0, krum_select >= 1, trim_beta in [0, 0.5)"
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
        if self.record_epsilon_budget is not None and not self.record_epsilon_budget > 0:
            raise ValueError("federated.record_epsilon_budget must be > 0 (unset: no budget)")
        if (
            self.record_epsilon_budget is not None
            and self.record_dp is not None
            and self.record_dp.noise_multiplier == 0
        ):
            raise ValueError(
                "federated.record_dp.noise_multiplier 0 spends infinite ε, so under "
                "record_epsilon_budget no client could ever train: set noise_multiplier > 0 "
                "(or target_epsilon), or drop the budget"
            )
        for option, bound in (
            ("max_update_norm", self.max_update_norm),
            ("max_client_weight", self.max_client_weight),
        ):
            if bound is not None and not bound > 0:
                raise ValueError(f"federated.{option} must be > 0 (unset: 10× the round's median)")
        if self.record_period < 1:
            raise ValueError("federated.record_period must be >= 1 (seconds)")
        for option, enabled in (
            ("report_train_loss", self.report_train_loss),
            ("weight_by_examples", self.private and self.weight_by_examples),
        ):
            if self.private and enabled:
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

    def _check_secure_aggregation(self, secure: SecureAggregationConfig) -> None:
        if STRATEGIES[self.strategy].robust:
            raise ValueError(
                f"federated.strategy {self.strategy!r} does not compose with "
                "secure_aggregation: a robust rule must see every update to leave the hostile "
                "ones out, and SecAgg+ shows the server only their sum. Choose one defence: "
                "drop secure_aggregation, or use fedavg, fedavgm, fedprox or fedadam"
            )
        if self.central_dp is None:
            raise ValueError(
                "federated.secure_aggregation needs central_dp: its quantisation range is the "
                "clipping norm and it releases DP-FedAvg's sum (add central_dp, or drop "
                "secure_aggregation)"
            )
        if self.report_train_loss:
            raise ValueError(
                "federated.report_train_loss sends each client's loss in the clear next to "
                "its masked update, which secure_aggregation is there to hide: set it to false"
            )
        if secure.min_contributors is None and self.fraction_per_round > 0:
            raise ValueError(
                "federated.secure_aggregation.min_contributors must be set with "
                "fraction_per_round (clients calibrate their noise share to it before they "
                "know the population)"
            )

    @property
    def secure_min_contributors(self) -> int:
        """Masked updates a round needs before the server unmasks: distributed noise shares
        are calibrated to this many (``SecureAggregationConfig``)."""
        secure = self.secure_aggregation
        assert secure is not None
        if secure.min_contributors is not None:
            return secure.min_contributors
        return max(3, -(-self.clients_per_round // 2))

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
