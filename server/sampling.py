"""Client sampling as a strategy wrapper: the server chooses each round's cohort itself.

Written here rather than left to Flower's strategies because Flower 1.42 samples with Python's
global ``random`` over node IDs in the grid's order: the cohort then depends on random node IDs
(so the same config does not choose the same clients in a Flower simulation and in the
in-process loop), and under user-level DP the accountant's amplification by sampling needs a
cohort nobody can predict. This wrapper draws the cohort from its own generator (private under
user-level DP, seeded otherwise or in the reproducible mode: ``server.strategy``) over the
nodes in the order the grid gives, which ``server.rounds`` makes the order of the clients'
partitions, and offers the wrapped strategy exactly that cohort (it is built to take all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedrec.federation.arrays import record_numpy
from server.wrapper import StrategyWrapper

# (round, stream) -> generator: stream 0 samples the training cohort (and, under user-level DP,
# draws its noise), stream 1 the evaluation cohort.
RoundGenerator = Callable[[int, int], np.random.Generator]
TRAIN, EVALUATE = 0, 1


def round_generator(seed: int | None) -> RoundGenerator:
    """Private generators (fresh OS entropy each call), or with ``seed`` (reproducible mode)
    one generator per round and stream derived from it, so a resumed run replays its rounds."""
    if seed is None:
        return lambda _round, _stream: np.random.default_rng()
    return lambda server_round, stream: np.random.default_rng([seed, server_round, 0xD9, stream])


class Cohort:
    """The part of a ``Grid`` a strategy's ``configure_*`` reads: the chosen node IDs."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return self.node_ids


class CohortSampler(StrategyWrapper):
    """Offers the wrapped strategy (built with ``fraction_*=1`` and ``min_*_nodes=0``) a cohort
    of ``cohort`` of the ``population`` clients: ``fixed`` (exactly the cohort, without
    replacement) or ``poisson`` (each client with probability cohort / population); clients are
    asked to evaluate only when ``evaluate`` (the federated audit), a fixed cohort. A round
    waits until a cohort's worth of clients is connected, or with ``whole_population`` all of
    them (a fixed cohort accounted as drawn from the whole population must be)."""

    def __init__(
        self,
        strategy: Strategy,
        cohort: int,
        population: int,
        sampling: str,
        generator: RoundGenerator,
        evaluate: bool = False,
        whole_population: bool = False,
        averages: bool = False,
    ):
        super().__init__(strategy)
        # The wrapped strategy's aggregate is FedAvg's weighted mean of the replies (FedAvg,
        # FedAvgM, FedProx, FedAdam; not the robust rules, which need each update).
        self.averages = averages
        self.dtypes: list[np.dtype] = []  # of the global arrays this round sent
        if not 0 < cohort <= population:
            raise ValueError(f"cohort {cohort} must lie in 1..population ({population})")
        self.cohort = cohort
        self.population = population
        self.sampling = sampling
        self.generator = generator
        self.evaluate = evaluate
        self.whole_population = whole_population
        self.rng = generator(0, TRAIN)
        self.last_sampled = 0  # this round's cohort size (Poisson: random)
        # The server's own check of a sampled node (its client's budget, by the server's
        # ledger): a node it fails is not asked to train; set by ``server.rounds``.
        self.may_train: Callable[[int], bool] = lambda _node: True

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    def sample(self, node_ids: list[int], sampling: str, rng: np.random.Generator) -> list[int]:
        """This round's cohort of ``node_ids`` (in the grid's order), drawn from ``rng``."""
        if sampling == "poisson":
            joined = rng.random(len(node_ids)) < self.sample_rate
            return [n for n, j in zip(node_ids, joined, strict=True) if j]
        chosen = rng.choice(len(node_ids), size=min(self.cohort, len(node_ids)), replace=False)
        return [node_ids[i] for i in sorted(chosen)]

    def _connected(self, grid: Grid, whole_population: bool) -> list[int]:
        """The connected nodes, once a cohort's worth is (or, ``whole_population``, all)."""
        return sample_nodes(grid, self.population if whole_population else self.cohort, 0)[1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.rng = self.generator(server_round, TRAIN)
        connected = self._connected(grid, self.whole_population)
        # Sampled first, then checked: the draw (and so the accountant's q) is the same.
        chosen = [n for n in self.sample(connected, self.sampling, self.rng) if self.may_train(n)]
        self.last_sampled = len(chosen)
        self.dtypes = [a.dtype for a in record_numpy(arrays)]
        return self.strategy.configure_train(server_round, arrays, config, Cohort(chosen))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """With an averaging strategy, the weighted mean of the replies is taken here and
        handed to it as its only reply (weight 1, so its own mean returns it exactly): Flower's
        ``aggregate_arrayrecords`` re-reads every reply's ``.npy`` bytes, ≈ 0.6 s a round for
        1,000 replies (BENCHMARKS.md, population scale). The metrics are the strategy's own
        aggregate of all the replies."""
        replies = list(replies)
        trained = [r for r in replies if not r.has_error()]
        if not self.averages or not trained:
            return self.strategy.aggregate_train(server_round, replies)
        key = cast(str, getattr(self.strategy, "weighted_by_key", "num-examples"))
        weights = [float(cast(float, r.content["metrics"][key])) for r in trained]
        total = sum(weights)
        if total <= 0:
            return self.strategy.aggregate_train(server_round, replies)
        first = cast(ArrayRecord, trained[0].content["arrays"])
        sums = [np.zeros(a.shape, dtype=np.float64) for a in record_numpy(first)]
        # The mean keeps the global model's dtypes (a reply's float16 must not become them).
        dtypes = self.dtypes or [a.dtype for a in record_numpy(first)]
        for reply, weight in zip(trained, weights, strict=True):
            values = record_numpy(cast(ArrayRecord, reply.content["arrays"]))
            for acc, value in zip(sums, values, strict=True):
                acc += value if weight == 1.0 else weight * value
        mean = ArrayRecord(
            {
                k: Array(np.asarray(acc / total, dtype=dtype))
                for k, acc, dtype in zip(first.keys(), sums, dtypes, strict=True)
            }
        )
        metrics_of = getattr(self.strategy, "train_metrics_aggr_fn", None)
        metrics = None if metrics_of is None else metrics_of([r.content for r in trained], key)
        release = Message(
            RecordDict({"arrays": mean, "metrics": MetricRecord({key: 1})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        # The failures go along, so the strategy logs them as it would have.
        failed = [r for r in replies if r.has_error()]
        arrays, _ = self.strategy.aggregate_train(server_round, [release, *failed])
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.evaluate:
            return []
        rng = self.generator(server_round, EVALUATE)
        chosen = self.sample(self._connected(grid, False), "fixed", rng)
        return self.strategy.configure_evaluate(server_round, arrays, config, Cohort(chosen))  # type: ignore[arg-type]
