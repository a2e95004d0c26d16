"""User-level DP-FedAvg as a strategy wrapper: the client sampling and the noise the accountant
assumes, added before the server optimizer.

Written here rather than taken from Flower because Flower 1.42's
``DifferentialPrivacyClientSideFixedClipping`` (a) adds the noise to the *output* of the
wrapped strategy, so with FedAdam or FedAvgM the noise is rescaled by the optimizer (measured:
effective σ 0.07 with FedAdam, 0.27 with FedAvgM, against the nominal 1), and (b) samples a
fixed-size cohort with Python's global ``random``, seeded from the config, while Opacus'
accountants assume Poisson sampling. This wrapper:

- samples the cohort itself from a private generator (``server.sampling.CohortSampler``):
  Poisson (each client independently with probability q) or a fixed-size draw without
  replacement, matching the ledger's accountant;
- re-clips every reply to ``clipping_norm`` (clients clip in their round,
  ``fedrec.federation.client.clip_update``; a client that skips it gains nothing); a cohort
  node's sum of its clients' clipped updates (``server.cohort``) counts as that many updates
  and is dropped if its norm exceeds count·C;
- adds N(0, (σ·C)²) to the *sum* of clipped updates and divides by a public constant, the
  expected cohort, so the sensitivity is C whoever replies;
- hands the noised mean to the wrapped strategy as its only reply, so FedAvg, FedAvgM, FedAdam
  and FedProx's server step are post-processing of a DP release;
- with adaptive clipping (Andrew et al. 2021) moves the clipping norm towards a quantile of the
  update norms after each round, from the noised count of updates within it (each client's
  ``norm-bit``: its update before its own clip, which the server never sees). Flower's
  adaptive-clipping wrappers divide that count by the number of replies (under Poisson
  sampling a private number, so the count's sensitivity is not the ½ its noise assumes) and
  draw the noise from NumPy's global generator; here the count is centred (Σ(bᵢ − ½)), noised
  from the private generator and divided by the public expected cohort.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    compute_adaptive_noise_params,
)

from fedrec.federation.arrays import record_numpy
from fedrec.federation.cohort import NODE_SUM, NODE_SUM_FACTS
from fedrec.federation.config import (
    AdaptiveClippingConfig,
    CentralDPConfig,
    clipped_count_stddev,
)
from fedrec.federation.updates import NORM_BIT, clipped_difference, l2_norm
from server.sampling import CohortSampler, RoundGenerator

log = logging.getLogger("fedrec.server")


def noise_split(central: CentralDPConfig, cohort: float) -> tuple[float, float]:
    """(σ of the clipped count, σ of the update) under adaptive clipping, so that the two
    releases together cost the ε of ``noise_multiplier`` (Flower's
    ``compute_adaptive_noise_params``); (0, σ) with a fixed clipping norm."""
    if central.adaptive_clipping is None:
        return 0.0, central.noise_multiplier
    count = clipped_count_stddev(central, cohort)
    return compute_adaptive_noise_params(central.noise_multiplier, cohort, count)


class UserLevelDP(CohortSampler):
    """Samples the cohort (``CohortSampler``: Poisson or fixed, the sampling the ledger's
    accountant assumes) and releases the noised mean of the clipped updates."""

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        cohort: int,
        population: int,
        sampling: str,
        generator: RoundGenerator,
        evaluate: bool = False,
        adaptive: AdaptiveClippingConfig | None = None,
        count_stddev: float = 0.0,
    ):
        # A fixed cohort is accounted as cohort / population: it is drawn from all of them.
        whole = sampling == "fixed"
        super().__init__(strategy, cohort, population, sampling, generator, evaluate, whole)
        self.noise_multiplier = noise_multiplier  # of the update (the split's, when adaptive)
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive
        self.count_stddev = count_stddev
        self.current: list[np.ndarray] = []
        self.keys: list[str] = []

    def summary(self) -> None:
        log.info(
            "user-level DP: σ %s, clip %s, %s sampling, q %.4g, noise before the server step",
            self.noise_multiplier,
            self.clipping_norm,
            self.sampling,
            self.sample_rate,
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.keys = list(arrays.keys())
        self.current = record_numpy(arrays)
        config[KEY_CLIPPING_NORM] = self.clipping_norm
        return super().configure_train(server_round, arrays, config, grid)

    def _fits(self, arrays: ArrayRecord | None) -> list[np.ndarray] | None:
        """``arrays`` as numpy when they have the global model's keys and shapes and finite
        values; None (and a warning) otherwise."""
        if arrays is None or list(arrays.keys()) != self.keys:
            log.warning("a reply's arrays do not match the global model's keys: dropped")
            return None
        values = record_numpy(arrays)
        if any(v.shape != c.shape for v, c in zip(values, self.current, strict=True)) or not all(
            np.isfinite(v).all() for v in values
        ):
            log.warning("a reply's arrays are misshapen or not finite: dropped")
            return None
        return values

    def _contribution(self, reply: Message) -> tuple[list[np.ndarray], int] | None:
        """What ``reply`` adds to the round's sum: its update clipped to C (one update), or
        its node's sum of clipped updates (``server.cohort``), kept only when its norm is
        within count·C, as a sum of that many clipped updates must be; None for a reply whose
        update is in its node's sum, or one that does not fit the model."""
        summed = reply.content.array_records.get(NODE_SUM)
        if summed is None:
            values = self._fits(reply.content.array_records.get("arrays"))
            if values is None:
                return None
            update, _ = clipped_difference(values, self.current, self.clipping_norm)
            return update, 1
        total = self._fits(summed)
        count = int(cast(int, reply.content.metric_records[NODE_SUM_FACTS]["count"]))
        if total is None:
            return None
        norm = l2_norm(total)
        if norm > count * self.clipping_norm * (1 + 1e-6):
            log.warning(
                "a node's sum of %d updates has norm %.4g > %d × C (%.4g): dropped",
                count,
                norm,
                count,
                self.clipping_norm,
            )
            return None
        return [t.astype(np.float64) for t in total], count

    def within_clip(self, reply: Message) -> bool:
        """Adaptive clipping's bit for ``reply``: its client's ``norm-bit`` (the update before
        the client clipped it: the server sees it clipped), read as 1 only when it is 1."""
        return reply.content.metric_records["metrics"].get(NORM_BIT) == 1

    def noised_mean(self, total: list[np.ndarray], noised: bool = True) -> list[np.ndarray]:
        """(Σ clipped updates + N(0, (σC)²)) / expected cohort, per array; ``noised`` False when
        the noise is already in ``total`` (SecAgg+'s distributed noise, ``server.secagg``)."""
        std = self.noise_multiplier * self.clipping_norm if noised else 0.0
        return [
            ((acc + self.rng.normal(0.0, std, acc.shape)) / self.cohort).astype(c.dtype)
            for acc, c in zip(total, self.current, strict=True)
        ]

    def release(
        self, server_round: int, total: list[np.ndarray], contributors: int, noised: bool = True
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """The round's DP release from the sum of ``contributors`` clipped updates: the noised
        mean, handed to the wrapped strategy as its only reply, so its own step (FedAdam's,
        FedAvgM's) is post-processing."""
        mean = self.noised_mean(total, noised)
        noised_arrays = ArrayRecord(
            {k: Array(c + m) for k, c, m in zip(self.keys, self.current, mean, strict=True)}
        )
        release = Message(
            RecordDict({"arrays": noised_arrays, "metrics": MetricRecord({"num-examples": 1})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = self.strategy.aggregate_train(server_round, [release])
        return arrays, MetricRecord(
            {"dp-replies": contributors, "clipping-norm": float(self.clipping_norm)}
        )

    def adapt_clipping_norm(self, within: list[bool]) -> float:
        """The next round's C from this round's updates (``within``: each inside C?): the
        centred count noised with σ_b, over the expected cohort; returns the noised fraction."""
        assert self.adaptive is not None
        centred = sum(within) - len(within) / 2 + self.rng.normal(0.0, self.count_stddev)
        fraction = float(centred / self.cohort + 0.5)
        step = self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile)
        self.clipping_norm = float(self.clipping_norm * math.exp(-step))
        return fraction

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replied = [r for r in replies if not r.has_error()]
        total = [np.zeros_like(c, dtype=np.float64) for c in self.current]
        contributors = 0
        # A cohort node's clients reply with metrics only, their updates in the sum one of them
        # carries: expected, as many as the sums hold beyond their carriers; others dropped.
        arrayless, in_sums = 0, 0
        for reply in replied:
            records = reply.content.array_records
            if "arrays" not in records and NODE_SUM not in records:
                arrayless += 1
                continue
            contribution = self._contribution(reply)
            if contribution is None:
                continue
            update, count = contribution
            for acc, u in zip(total, update, strict=True):
                acc += u
            contributors += count
            in_sums += count - 1 if NODE_SUM in records else 0
        if arrayless > in_sums:
            log.warning(
                "%d replies carried no update and are in no node's sum: dropped",
                arrayless - in_sums,
            )
        arrays, metrics = self.release(server_round, total, contributors)
        if self.adaptive is not None:
            fraction = self.adapt_clipping_norm([self.within_clip(r) for r in replied])
            metrics["within-clip-fraction"] = fraction  # noised: a DP release
        return arrays, metrics
