"""Strategy construction and the ledger-keeping wrapper around it.

Like Flower's own DP wrappers, ``LedgerKeeper`` wraps any strategy and delegates to it; it
records every round's train replies for the privacy ledger and stops the federation before a
round that would exceed the federation's ε budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from fedrec.federation import FederatedConfig

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


def build_strategy(fed: FederatedConfig, num_clients: int) -> Strategy:
    """Flower's strategy named in the config, wrapped in Flower's DP-FedAvg when asked."""
    sampled = fed.sampled_clients(num_clients)
    common: dict[str, Any] = {
        "fraction_train": sampled / num_clients,
        "fraction_evaluate": 0.0,  # evaluation runs on the server each round (research mode)
        "min_train_nodes": sampled,
        "min_evaluate_nodes": 0,
        "min_available_nodes": sampled,
    }
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
        strategy = FedAdam(**common, eta=fed.server_learning_rate, eta_l=fed.local_learning_rate)
    if fed.central_dp is not None:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=fed.central_dp.noise_multiplier,
            clipping_norm=fed.central_dp.clipping_norm,
            num_sampled_clients=sampled,
        )
    return strategy


class LedgerKeeper(Strategy):
    """Delegates to ``strategy``; hands each round's train replies to ``on_replies`` and asks
    ``may_start(round)`` before configuring a round."""

    def __init__(
        self,
        strategy: Strategy,
        on_replies: Callable[[int, list[Message]], None],
        may_start: Callable[[int], bool],
    ):
        super().__init__()
        self.strategy = strategy
        self.on_replies = on_replies
        self.may_start = may_start

    def summary(self) -> None:
        self.strategy.summary()

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
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
