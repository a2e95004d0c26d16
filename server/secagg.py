"""A training round under secure aggregation (SecAgg+): the server learns the sum of the
cohort's clipped updates and nothing about any one of them.

Bridge: Flower 1.42 implements SecAgg+ only on its legacy API (``SecAggPlusWorkflow`` reads a
``LegacyContext`` and calls a legacy ``Strategy``'s ``configure_fit``/``aggregate_fit``), and
nothing in ``flwr.serverapp.strategy`` knows it. So each round runs Flower's workflow
(``server.secagg_protocol``) inside fedrec's own loop (``server.rounds``): the strategy stack
chooses the cohort and builds the messages as in a plain round; the sampled clients are asked
whether they take part (one past its budget declines before any key is shared); the workflow
runs over those who join, every reply checked before Flower reads it; and the unmasked sum
goes to ``UserLevelDP.release``. On the devices, ``clients.secagg`` runs Flower's
``secaggplus_mod`` around fedrec's client round.

What each end trusts (``SecureAggregationConfig`` says which noise is used):
- Clipping is the client's: its round clips the update to C, and the server cannot check an
  update it never sees. The quantisation range bounds every coordinate a client following the
  protocol contributes (|x| ≤ R, ``fedrec.federation.secure``); a client running a modified
  protocol can add anything modulo 2³² to the sum, and nothing here can tell (the released
  mean is refused when it leaves [−R, R], which catches gross tampering only). That is why the
  robust rules, which need each update, are refused with SecAgg+.
- ``distributed`` noise: the server unmasks only a sum of at least ``min_contributors``
  updates, each carrying its share of the noise. Against the server, which knows who took
  part, sampling does not amplify: each round a user's update is in a sum is a Gaussian
  release to it, booked as the ``server-view`` party. A client colluding with the server can
  remove its own share, and a hostile one can leave its share out.
- ``central`` noise: the guarantee holds against whoever sees the model; the server sees the
  exact sum of the cohort's clipped updates (but still no individual update).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import Parameters
from flwr.common.constant import ErrorCode
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedrec.federation.config import FederatedConfig
from fedrec.federation.secure import (
    MASKED,
    PARTICIPATION,
    clipping_range,
    quantization_range,
    share_graph,
)
from server.dp import UserLevelDP
from server.secagg_protocol import CheckedStages, OfferedCohort, SecAggPlus

log = logging.getLogger("fedrec.server")


class SecureAggregation:
    """Runs one train round of ``fed`` under SecAgg+ over a grid and releases the sum through
    ``dp`` (central noise added there, or distributed noise already in the sum). The round's
    replies (metrics only: partition, refusal, DP statement) go to ``on_replies`` for the
    ledger before the sum is used; ``metrics_problem`` (the reply validator's check) refuses a
    masked update whose metrics are not to be believed, before it enters the sum."""

    def __init__(
        self,
        fed: FederatedConfig,
        dp: UserLevelDP,
        on_replies: Callable[[int, list[Message]], None],
        metrics_problem: Callable[[MetricRecord], str],
    ):
        assert fed.secure_aggregation is not None
        self.fed = fed
        self.settings = fed.secure_aggregation
        self.dp = dp
        self.on_replies = on_replies
        self.metrics_problem = metrics_problem
        self.min_contributors = fed.secure_min_contributors

    def train(
        self, grid: Grid, server_round: int, messages: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        sampled = {m.metadata.dst_node_id: m for m in messages}
        joining, declined = self._participants(grid, server_round, sampled)
        refusals = [_refusal(sampled[node]) for node in declined]
        unanswered = len(sampled) - len(joining) - len(declined)

        def facts(dropped: int) -> dict[str, int | float | list[int] | list[float]]:
            return {
                "secagg-sampled": len(sampled),
                "secagg-declined": len(declined),
                "secagg-dropped": unanswered + dropped,
            }

        if len(joining) < self.min_contributors:
            log.warning(
                "round %d: %d clients take part, fewer than secure_aggregation.min_contributors "
                "(%d): nothing is aggregated",
                server_round,
                len(joining),
                self.min_contributors,
            )
            self.on_replies(server_round, refusals)
            return None, MetricRecord(facts(0))
        sent = {node: sampled[node] for node in joining}
        offer, stages = self._protocol(grid, server_round, sent)
        replies = self._replies(sent, stages)
        dropped = len(stages.failed - {r.metadata.src_node_id for r in stages.masking})
        self.on_replies(server_round, replies + refusals)  # the ledger first: the release follows
        mean = self._believable(offer.mean)
        if mean is None:
            log.warning("round %d: secure aggregation did not complete: no update", server_round)
            return None, MetricRecord(facts(dropped))
        contributors = len(offer.results)
        total = [m * contributors for m in mean]
        released, metrics = self.dp.release(
            server_round, total, contributors, noised=self.settings.noise == "central"
        )
        return released, MetricRecord({**dict(metrics), **facts(dropped)})

    def _protocol(
        self, grid: Grid, server_round: int, sent: dict[int, Message]
    ) -> tuple[OfferedCohort, CheckedStages]:
        """Flower's SecAgg+ workflow over the clients of ``sent`` (their train messages)."""
        offer = OfferedCohort(sent, grid)
        arrays = next(iter(sent.values())).content.array_records["arrays"]
        stages = CheckedStages(
            grid, [a.shape for a in arrays.to_numpy_ndarrays()], self.metrics_problem
        )
        shares, threshold = share_graph(self.fed, len(sent))
        workflow = SecAggPlus(
            shares,
            # Flower takes a count only below the share count; 1.0 is "all of them"
            threshold if threshold < shares else 1.0,
            min_contributors=self.min_contributors,
            max_weight=1.0,  # every client's weight is 1 (DP-FedAvg's unweighted sum)
            clipping_range=clipping_range(self.fed),
            quantization_range=quantization_range(len(sent)),
            timeout=self.fed.round_timeout,
        )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=offer,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            Parameters(tensors=[], tensor_type=""), keep_input=True
        )
        workflow(stages, context)  # type: ignore[arg-type]  # it calls send_and_receive only
        return offer, stages

    def _participants(
        self, grid: Grid, server_round: int, sampled: dict[int, Message]
    ) -> tuple[list[int], list[int]]:
        """Ask the sampled clients whether they take part (a client past its budget says no)
        before the protocol fixes the cohort its secrets are shared over: (joining, declined).
        One that does not answer is neither: it is simply not in the round."""
        asked = [
            Message(
                RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=node,
                message_type=PARTICIPATION,
            )
            for node in sampled
        ]
        joining, declined = [], []
        for reply in grid.send_and_receive(asked, timeout=self.fed.round_timeout):
            node = reply.metadata.src_node_id
            answer = None if reply.has_error() else reply.content.config_records.get("config")
            joins = None if answer is None else answer.get("joins")
            if node not in sampled or not isinstance(joins, bool):
                log.warning("node %d did not say whether it joins: not in the round", node)
            elif joins:
                joining.append(node)
            else:
                declined.append(node)
                log.info("node %d declines: %s", node, answer.get("reason", ""))  # type: ignore[union-attr]
        return sorted(joining), sorted(declined)

    def _replies(self, sent: dict[int, Message], stages: CheckedStages) -> list[Message]:
        """One reply per participant for the ledger: the metrics of those whose masked update
        arrived (in the sum when it was unmasked; booked either way, so ε is never
        under-reported) and an error for those that failed before masking."""
        replies: list[Message] = []
        masked = set()
        for reply in stages.masking:
            node = reply.metadata.src_node_id
            masked.add(node)
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            metrics = MetricRecord({**dict(fitres.metrics), MASKED: 1})  # type: ignore[arg-type]
            replies.append(Message(RecordDict({"metrics": metrics}), reply_to=sent[node]))
        for node in sorted(stages.failed - masked):
            error = Error(ErrorCode.UNKNOWN, "dropped out of SecAgg+ before its masked update")
            replies.append(Message(error, reply_to=sent[node]))
        return replies

    def _believable(self, mean: list[np.ndarray] | None) -> list[np.ndarray] | None:
        """The unmasked mean, unless it cannot be one: a mean of values in [−R, R] lies there
        (a client that tampered with its weight or masks can push it out, or to inf/NaN)."""
        if mean is None:
            return None
        bound = clipping_range(self.fed) * (1 + 1e-6)
        if all(np.isfinite(m).all() and np.abs(m).max(initial=0.0) <= bound for m in mean):
            return mean
        log.error("the unmasked mean leaves [-R, R]: a client tampered with the protocol; dropped")
        return None


def _refusal(message: Message) -> Message:
    """A declined client's place in the round's replies: a refusal, as in a plain round."""
    refused = MetricRecord({"refused": 1, "num-examples": 0})
    return Message(RecordDict({"metrics": refused}), reply_to=message)
