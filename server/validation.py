"""Reply validation before aggregation, as a strategy wrapper: the server never aggregates a
reply it has not checked against the global model it sent.

A train reply is kept only when its arrays have exactly the global model's keys, shapes and
kinds of dtype, every value is finite, its ``num-examples`` is a non-negative integer, its metrics are
numbers, and (without user-level DP, whose wrapper clips every update to C itself) its update
is not an outlier: its L2 norm is at most ``max_update_norm``, or, unset, at most
``norm_multiple`` (10) × the median norm of the round's replies (with three replies or more).
The server decides the weight: 1 for every client that trained when the federation does not
weight by examples, else the client's count capped at ``max_client_weight`` (unset:
``weight_multiple`` (10) × the round's median count). Rejected replies are logged with their node and counted in the
round's train metrics (``rejected``); the round goes on with the rest. With cohort nodes under
user-level DP (``node_sums``) a client's reply may hold metrics only, its update being in its
node's sum, which is checked as the model's arrays here and against count·C in ``server.dp``.

Written here because Flower 1.42's strategies average whatever they are given (a NaN, a
misshapen array or a weight of 10⁹ takes the global model over) and its validation hooks are
for configuration, not for replies.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrec.federation.arrays import array_numpy, record_numpy
from fedrec.federation.cohort import NODE_SUM, NODE_SUM_FACTS
from server.wrapper import StrategyWrapper

log = logging.getLogger("fedrec.server")
NUMBER = (int, float)


class ReplyValidator(StrategyWrapper):
    def __init__(
        self,
        strategy: Strategy,
        weighted: bool,
        check_norm: bool,
        max_update_norm: float | None = None,
        max_client_weight: int | None = None,
        norm_multiple: float = 10.0,
        weight_multiple: float = 10.0,
        statement_problem: Callable[[MetricRecord], str] | None = None,
        node_sums: bool = False,
    ):
        super().__init__(strategy)
        self.node_sums = node_sums  # cohort nodes send sums (server.cohort): metrics-only replies
        self.weighted = weighted
        self.check_norm = check_norm
        self.max_update_norm = max_update_norm
        self.max_client_weight = max_client_weight
        self.norm_multiple = norm_multiple
        self.weight_multiple = weight_multiple
        # record-level DP: whether a reply's statement of its release fits the config
        # (``fedrec.federation.privacy.dp_statement_problem``); one that does not would
        # under-report its ε in the server's ledger
        self.statement_problem = statement_problem
        self.current: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = dict(zip(arrays.keys(), record_numpy(arrays), strict=True))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        checked: list[tuple[Message, float, int]] = []
        rejected = 0
        for reply in replies:
            if reply.has_error():
                checked.append((reply, 0.0, 0))  # the strategies count failures themselves
                continue
            problem, norm, weight = self._inspect(reply)
            if problem:
                log.warning(
                    "round %d: reply of node %d rejected: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    problem,
                )
                rejected += 1
                continue
            checked.append((reply, norm, weight))
        checked, inconsistent = self._same_metric_keys(checked, server_round)
        rejected += inconsistent
        kept = [r for r in checked if not r[0].has_error()]
        norms = [n for _, n, w in kept if w > 0]
        weights = [float(w) for _, _, w in kept if w > 0]
        norm_bound = self._bound(self.max_update_norm, norms, self.norm_multiple)
        weight_bound = self._bound(self.max_client_weight, weights, self.weight_multiple)
        accepted: list[Message] = []
        for reply, norm, weight in checked:
            if reply.has_error():
                accepted.append(reply)
            elif self.check_norm and norm_bound is not None and norm > norm_bound:
                log.warning(
                    "round %d: reply of node %d rejected: update norm %.3g > bound %.3g",
                    server_round,
                    reply.metadata.src_node_id,
                    norm,
                    norm_bound,
                )
                rejected += 1
            else:
                accepted.append(self._reweighted(reply, weight, weight_bound))
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        facts = MetricRecord({"rejected": rejected})
        if metrics is not None:
            facts = MetricRecord({**dict(metrics), "rejected": rejected})
        return arrays, facts

    @staticmethod
    def _same_metric_keys(
        checked: list[tuple[Message, float, int]], server_round: int
    ) -> tuple[list[tuple[Message, float, int]], int]:
        """The replies whose metric names are the round's most common set (Flower's strategies
        refuse to average replies whose metrics differ), and how many were left out."""
        names = [
            None if r.has_error() else frozenset(r.content["metrics"].keys()) for r, _, _ in checked
        ]
        counts = Counter(n for n in names if n is not None)
        if len(counts) < 2:
            return checked, 0
        common = counts.most_common(1)[0][0]
        kept = []
        for entry, name in zip(checked, names, strict=True):
            if name is None or name == common:
                kept.append(entry)
            else:
                log.warning(
                    "round %d: reply of node %d rejected: its metrics %s are not the round's %s",
                    server_round,
                    entry[0].metadata.src_node_id,
                    sorted(name),
                    sorted(common),
                )
        return kept, len(checked) - len(kept)

    def _inspect(self, reply: Message) -> tuple[str, float, int]:
        """(what is wrong, or ""; the update's L2 norm; the reported weight). With node sums a
        reply may hold metrics only (its update is in its node's sum), and one client's reply
        per node carries that sum, checked as arrays of the model's shapes."""
        arrays = reply.content.array_records.get("arrays")
        metrics = reply.content.metric_records.get("metrics")
        summed = reply.content.array_records.get(NODE_SUM)
        if metrics is None or (arrays is None and not self.node_sums):
            return "no arrays or no metrics", 0.0, 0
        if arrays is not None and summed is not None:
            return "both its own arrays and a node's sum", 0.0, 0
        squared = 0.0
        if arrays is not None:
            problem, squared = self._arrays_problem(arrays, self.current)
        elif summed is not None:
            zeros = {k: np.zeros_like(v, dtype=np.float64) for k, v in self.current.items()}
            problem, _ = self._arrays_problem(summed, zeros)
            facts = reply.content.metric_records.get(NODE_SUM_FACTS)
            count = None if facts is None else facts.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                problem = problem or "a node's sum without a count of the updates in it"
        else:
            problem = ""
        problem = problem or self.metrics_problem(metrics)
        if problem:
            return problem, 0.0, 0
        return "", math.sqrt(squared), cast(int, metrics["num-examples"])

    @staticmethod
    def _arrays_problem(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str, float]:
        """(what is wrong with ``arrays`` as the model's, or ""; Σ (arrays − reference)²)."""
        if list(arrays.keys()) != list(reference):
            return "its arrays are not the global model's", 0.0
        squared = 0.0
        for key, array in arrays.items():
            try:
                value = array_numpy(array)
            except ValueError as err:
                return f"{key}: {err}", 0.0
            expected = reference[key]
            # Kinds, not widths: FedAdam's global arrays are float64, a client's model float32.
            if value.shape != expected.shape or value.dtype.kind != expected.dtype.kind:
                return (
                    f"{key}: {value.dtype}{value.shape} is not {expected.dtype}{expected.shape}",
                    0.0,
                )
            # One pass: a value that is not finite makes the squared norm not finite.
            difference = np.subtract(value, expected, dtype=np.float64).ravel()
            part = float(np.dot(difference, difference))
            if not math.isfinite(part):
                if np.isfinite(value).all():
                    return f"{key}: values so large that the update's norm overflows", 0.0
                return f"{key}: values that are not finite", 0.0
            squared += part
        return "", squared

    def metrics_problem(self, metrics: MetricRecord) -> str:
        """What is wrong with a train reply's metrics (finite numbers, a weight, the DP
        statement), or ""."""
        for name, sent in metrics.items():
            numbers = sent if isinstance(sent, list) else [sent]
            if not all(isinstance(v, NUMBER) and math.isfinite(v) for v in numbers):
                return f"metric {name} is not a finite number"
        weight = metrics.get("num-examples")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            return "num-examples is not a non-negative integer"
        return self.statement_problem(metrics) if self.statement_problem else ""

    @staticmethod
    def _bound(fixed: float | None, values: list[float], multiple: float) -> float | None:
        if fixed is not None:
            return float(fixed)
        if len(values) < 3:
            return None  # too few replies to call one an outlier
        return multiple * float(np.median(values))

    def _reweighted(self, reply: Message, weight: int, bound: float | None) -> Message:
        """The reply with the weight the server decides (``num-examples``)."""
        if weight == 0:
            return reply  # refused or nothing to train on: stays out of the mean
        decided = 1
        if self.weighted:
            decided = weight if bound is None else min(weight, max(1, int(bound)))
        if decided != weight:
            metrics = dict(reply.content.metric_records["metrics"])
            reply.content["metrics"] = MetricRecord({**metrics, "num-examples": decided})
        return reply
