"""Strategy construction and the ledger-keeping wrapper around it.

Like Flower's own DP wrappers, ``LedgerKeeper`` wraps any strategy and delegates to it; it
records every round's train replies for the privacy ledger and stops the federation before a
round that would exceed the federation's ε budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from fedrec.federation import FederatedConfig
from server.dp import UserLevelDP, round_generator
from server.wrapper import StrategyWrapper

log = logging.getLogger("fedrec.server")

# Server-optimizer state of Flower's strategies (FedAdam/FedOpt moments, FedAvgM momentum):
# Flower keeps it in attributes and has no state_dict, so checkpoints read these by name.
_OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")


def _strategies(strategy: Strategy) -> list[Strategy]:
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)  # type: ignore[attr-defined]
    return chain


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """The server-optimizer state of ``strategy`` and every strategy it wraps."""
    return [
        {name: getattr(s, name) for name in _OPTIMIZER_STATE if hasattr(s, name)}
        for s in _strategies(strategy)
    ]


def load_strategy_state(strategy: Strategy, state: list[dict[str, Any]]) -> None:
    chain = _strategies(strategy)
    if len(chain) != len(state):
        raise ValueError("checkpoint was written by a different strategy stack")
    for target, values in zip(chain, state, strict=True):
        for name, value in values.items():
            setattr(target, name, value)


class StopFederation(Exception):
    """Raised before a round that must not run (the federation's privacy budget)."""


class ClientsFailed(StopFederation):
    """Raised when every client sampled for a round failed: the run stops instead of spinning."""


def build_strategy(
    fed: FederatedConfig, num_clients: int, seed: int, client_audit: bool = False
) -> Strategy:
    """Flower's strategy named in the config, wrapped in user-level DP (``server.dp``) when
    asked; ``client_audit``: sampled clients also evaluate (the federated audit). ``seed``
    seeds the DP noise and sampling only in ``federated.reproducible_noise`` mode."""
    sampled = fed.sampled_clients(num_clients)
    common: dict[str, Any] = {
        "fraction_train": sampled / num_clients,
        # Model quality is evaluated on the server each round (research mode); clients are asked
        # to evaluate only for the federated audit, where they send group sums.
        "fraction_evaluate": sampled / num_clients if client_audit else 0.0,
        "min_train_nodes": sampled,
        "min_evaluate_nodes": sampled if client_audit else 0,
        "min_available_nodes": sampled,
    }
    if fed.central_dp is not None:  # the DP wrapper chooses the cohort; train all it offers
        common.update(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)
    strategy: Strategy
    if fed.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif fed.strategy == "fedavgm":
        strategy = FedAvgM(
            **common,
            server_learning_rate=fed.server_learning_rate,
            server_momentum=fed.server_momentum,
        )
    elif fed.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=fed.proximal_mu)
    else:
        strategy = FedAdam(
            **common,
            eta=fed.server_learning_rate,
            eta_l=fed.local_learning_rate,
            tau=fed.server_tau,
        )
    if fed.central_dp is not None:
        strategy = UserLevelDP(
            strategy,
            noise_multiplier=fed.central_dp.noise_multiplier,
            clipping_norm=fed.central_dp.clipping_norm,
            cohort=sampled,
            population=num_clients,
            sampling=fed.central_dp.sampling,
            generator=round_generator(seed if fed.reproducible_noise else None),
        )
    return strategy


class LedgerKeeper(StrategyWrapper):
    """Delegates to ``strategy``; hands each round's train replies to ``on_replies``, asks
    ``may_start(round)`` before configuring a round and, when given, lets ``on_evaluate``
    aggregate the evaluate replies."""

    def __init__(
        self,
        strategy: Strategy,
        on_replies: Callable[[int, list[Message]], None],
        may_start: Callable[[int], bool],
        on_evaluate: Callable[[int, list[Message]], MetricRecord | None] | None = None,
    ):
        super().__init__(strategy)
        self.on_replies = on_replies
        self.may_start = may_start
        self.on_evaluate = on_evaluate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.may_start(server_round):
            raise StopFederation(f"round {server_round} would exceed the federation's ε budget")
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.on_replies(server_round, replies)
        if isinstance(self.strategy, UserLevelDP):  # it releases a noised mean in every round
            return self.strategy.aggregate_train(server_round, replies)
        # A client that refused (privacy budget) or had nothing to train on replies with
        # num-examples 0; if nobody trained, Flower's weighted mean would divide by zero.
        trained = [
            r
            for r in replies
            if r.has_error() or int(cast(int, r.content["metrics"]["num-examples"])) > 0
        ]
        if not trained:
            log.warning("round %d: no sampled client trained; the global model stays", server_round)
            return None, None
        return self.strategy.aggregate_train(server_round, trained)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        # Audit sums must be added, not averaged as Flower's strategies do: the server handles them.
        if self.on_evaluate is not None:
            return self.on_evaluate(server_round, list(replies))
        return self.strategy.aggregate_evaluate(server_round, replies)
