"""Server strategies by name: the one registry ``federated.strategy`` is checked against.

Each entry names a Flower strategy class of ``flwr.serverapp.strategy`` and which
``FederatedConfig`` field feeds which of its arguments. The server builds it
(``server.strategy.build_strategy``); this layer stays free of Flower's app packages. A new
strategy is one entry here (and, when it is not Flower's, its class in ``server/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StrategySpec:
    """``flower_class``: a class of ``flwr.serverapp.strategy``, or ``module:Class``;
    ``options``: its keyword argument → the ``FederatedConfig`` field that sets it;
    ``robust``: it aggregates the individual updates robustly (Byzantine clients);
    ``averages``: its aggregate is FedAvg's weighted mean of the replies, which the server may
    then take itself (``server.sampling.CohortSampler``)."""

    flower_class: str
    options: dict[str, str] = field(default_factory=dict)
    robust: bool = False
    averages: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec("FedAvg", averages=True),
    "fedavgm": StrategySpec(
        "FedAvgM",
        {"server_learning_rate": "server_learning_rate", "server_momentum": "server_momentum"},
        averages=True,
    ),
    "fedprox": StrategySpec("FedProx", {"proximal_mu": "proximal_mu"}, averages=True),
    "fedadam": StrategySpec(
        "FedAdam",
        {"eta": "server_learning_rate", "eta_l": "local_learning_rate", "tau": "server_tau"},
        averages=True,
    ),
    # Robust aggregation: Flower's own rules, each assuming ``malicious_clients`` hostile
    # clients among a round's replies.
    "krum": StrategySpec("Krum", {"num_malicious_nodes": "malicious_clients"}, robust=True),
    "multikrum": StrategySpec(
        "MultiKrum",
        {"num_malicious_nodes": "malicious_clients", "num_nodes_to_select": "krum_select"},
        robust=True,
    ),
    "bulyan": StrategySpec("Bulyan", {"num_malicious_nodes": "malicious_clients"}, robust=True),
    "trimmedmean": StrategySpec("FedTrimmedAvg", {"beta": "trim_beta"}, robust=True),
    "median": StrategySpec("FedMedian", robust=True),
}
