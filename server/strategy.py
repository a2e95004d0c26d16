"""Strategy construction and the ledger-keeping wrapper around it.

Like Flower's own DP wrappers, ``LedgerKeeper`` wraps any strategy and delegates to it; it
hands every round's train replies to the server round (``server.federation``) for the privacy
ledger, and the federated audit's evaluate replies to be added up.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedrec.federation.config import FederatedConfig
from fedrec.federation.strategies import STRATEGIES
from server.dp import UserLevelDP, noise_split
from server.sampling import CohortSampler, round_generator
from server.wrapper import StrategyWrapper

log = logging.getLogger("fedrec.server")

# Server-optimizer state of Flower's strategies (FedAdam/FedOpt moments, FedAvgM momentum):
# Flower keeps it in attributes and has no state_dict, so checkpoints read these by name.
# the server optimizer's state, and adaptive clipping's current norm
_OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector", "clipping_norm")


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
        raise ValueError(
            "the checkpoint was written by a different strategy stack (another "
            "federated.strategy or central_dp, or fedrec before issue 13): resume it with the "
            "config and version that wrote it, or start a new run folder"
        )
    for target, values in zip(chain, state, strict=True):
        for name, value in values.items():
            setattr(target, name, value)


def build_strategy(
    fed: FederatedConfig, num_clients: int, seed: int, client_audit: bool = False
) -> Strategy:
    """The registered strategy ``fed.strategy`` (``fedrec.federation.strategies``) inside the
    server's cohort sampler, which is user-level DP (``server.dp``) when asked; with
    ``client_audit`` sampled clients also evaluate (the federated audit). ``seed`` seeds the
    cohorts without user-level DP; with it, the cohorts and the noise only in
    ``federated.reproducible_noise`` mode."""
    spec = STRATEGIES[fed.strategy]
    module, _, name = spec.flower_class.rpartition(":")
    cls = getattr(importlib.import_module(module or "flwr.serverapp.strategy"), name)
    # The sampler chooses the cohort: the strategy trains (and evaluates) all it is offered.
    strategy = cls(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=0,
        min_evaluate_nodes=0,
        min_available_nodes=0,
        **{arg: getattr(fed, field) for arg, field in spec.options.items()},
    )
    cohort = fed.sampled_clients(num_clients)
    # Who is sampled is private only where a guarantee rests on it (user-level DP's
    # amplification); otherwise the cohorts follow the seed, so a run can be repeated.
    seeded = fed.reproducible_noise or fed.central_dp is None
    generator = round_generator(seed if seeded else None)
    if fed.central_dp is None:
        return CohortSampler(
            strategy,
            cohort,
            num_clients,
            "fixed",
            generator,
            client_audit,
            averages=spec.averages,
        )
    count_stddev, update_noise = noise_split(fed.central_dp, cohort)
    return UserLevelDP(
        strategy,
        noise_multiplier=update_noise,
        clipping_norm=fed.central_dp.clipping_norm,
        cohort=cohort,
        population=num_clients,
        sampling=fed.central_dp.sampling,
        generator=generator,
        evaluate=client_audit,
        adaptive=fed.central_dp.adaptive_clipping,
        count_stddev=count_stddev,
    )


class LedgerKeeper(StrategyWrapper):
    """Delegates to ``strategy``; hands each round's train replies to ``on_replies`` and, when
    given, lets ``on_evaluate`` aggregate the evaluate replies."""

    def __init__(
        self,
        strategy: Strategy,
        on_replies: Callable[[int, list[Message]], None],
        on_evaluate: Callable[[int, list[Message]], MetricRecord | None] | None = None,
    ):
        super().__init__(strategy)
        self.on_replies = on_replies
        self.on_evaluate = on_evaluate

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
