"""A training round under secure aggregation (SecAgg+): the server learns the sum of the
cohort's clipped updates and nothing about any one of them.

Bridge: Flower 1.42 implements SecAgg+ only on its legacy API (``SecAggPlusWorkflow`` reads a
``LegacyContext`` and calls a legacy ``Strategy``'s ``configure_fit``/``aggregate_fit``), and
nothing in ``flwr.serverapp.strategy`` knows it. So each round runs Flower's workflow inside
fedrec's own loop (``server.rounds``): the strategy stack chooses the cohort and builds the
messages as in a plain round, ``_OfferedCohort`` hands them to the workflow as legacy
``FitIns``, and the unmasked sum goes to ``UserLevelDP.release``. On the devices,
``clients.secagg`` runs Flower's ``secaggplus_mod`` around fedrec's client round.

What each end trusts (SecureAggregationConfig says which noise is used):
- Clipping is the client's: its round clips the update to C (``train_round``), and the server
  cannot check an update it never sees. The quantisation range bounds every coordinate a
  client following the protocol contributes (|x| ≤ R, ``fedrec.federation.secure``); a client
  that runs a modified protocol can add anything modulo 2³² to the sum, and nothing here can
  tell. That is why the robust rules, which need each update, are refused with SecAgg+.
- ``distributed`` noise protects users against the honest-but-curious server as well: the
  server unmasks only a sum of at least ``min_contributors`` updates, each carrying its share
  of the noise (a client colluding with the server can subtract its own share).
- ``central`` noise protects users against whoever sees the model; the server sees the exact
  sum of the cohort's clipped updates (but still no individual update).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedrec.federation.config import FederatedConfig
from fedrec.federation.secure import (
    ARRAY_KEYS,
    PARTICIPATION,
    clipping_range,
    quantization_range,
)
from server.dp import UserLevelDP

log = logging.getLogger("fedrec.server")


class SecureAggregation:
    """Runs one train round of ``fed`` under SecAgg+ over a grid and releases the sum through
    ``dp`` (central noise added there, or distributed noise already in the sum). The round's
    replies (metrics only: partition, refusal, DP statement) go to ``on_replies`` for the
    ledger before the sum is used; ``metrics_problem`` (the reply validator's check) names a
    reply whose metrics are not to be believed."""

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
        facts = {
            "secagg-sampled": len(sampled),
            "secagg-declined": len(declined),
            "secagg-dropped": 0,
        }
        sent = {node: sampled[node] for node in joining}
        refusals = [_refusal(sampled[node]) for node in declined]
        if len(sent) < self.min_contributors:
            log.warning(
                "round %d: %d clients take part, fewer than secure_aggregation.min_contributors "
                "(%d): nothing is aggregated",
                server_round,
                len(sent),
                self.min_contributors,
            )
            self.on_replies(server_round, refusals)
            return None, MetricRecord(facts)
        offer = _OfferedCohort(sent, grid)
        stages = _StageLog(grid)
        workflow = _SecAggPlus(
            self.settings.num_shares,
            self.settings.reconstruction_threshold,
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
        workflow(cast(Grid, stages), context)
        replies, dropped = self._replies(sent, stages)
        facts["secagg-dropped"] = dropped
        self.on_replies(server_round, replies + refusals)  # the ledger first: the release follows
        if offer.mean is None:
            log.warning("round %d: secure aggregation did not complete: no update", server_round)
            return None, MetricRecord(facts)
        contributors = len(offer.results)
        total = [mean * contributors for mean in offer.mean]
        arrays, metrics = self.dp.release(
            server_round, total, contributors, noised=self.settings.noise == "central"
        )
        return arrays, MetricRecord({**dict(metrics), **facts})

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
            if reply.has_error():
                log.warning("node %d did not say whether it joins", reply.metadata.src_node_id)
                continue
            answer = reply.content.config_records["config"]
            node = reply.metadata.src_node_id
            if node not in sampled:
                continue
            if answer.get("joins") is True:
                joining.append(node)
            else:
                declined.append(node)
                log.info("node %d declines: %s", node, answer.get("reason", ""))
        return sorted(joining), sorted(declined)

    def _replies(self, sent: dict[int, Message], stages: _StageLog) -> tuple[list[Message], int]:
        """One reply per participant for the ledger: the metrics of those that sent a masked
        update (in the sum when it was unmasked; booked either way, so ε is never
        under-reported), an error for those that dropped out; and how many dropped."""
        replies: list[Message] = []
        masked = [r for r in stages.masking if not r.has_error()]
        for reply in masked:
            node = reply.metadata.src_node_id
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            metrics = MetricRecord(dict(fitres.metrics))  # type: ignore[arg-type]
            problem = self.metrics_problem(metrics)
            if problem:  # its masked update is in the sum all the same: SecAgg+ cannot drop it
                log.warning("node %d: metrics not believed (%s)", node, problem)
                continue
            replies.append(Message(RecordDict({"metrics": metrics}), reply_to=sent[node]))
        dropped = sorted(set(sent) - {r.metadata.src_node_id for r in masked})
        for node in dropped:
            error = Error(ErrorCode.UNKNOWN, "dropped out of SecAgg+ before its masked update")
            replies.append(Message(error, reply_to=sent[node]))
        if dropped:
            log.info("%d of %d clients dropped out of the round", len(dropped), len(sent))
        return replies, len(dropped)


def _refusal(message: Message) -> Message:
    """A declined client's place in the round's replies: a refusal, as in a plain round."""
    refused = MetricRecord({"refused": 1, "num-examples": 0})
    return Message(RecordDict({"metrics": refused}), reply_to=message)


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, plus three things it lacks:

    - the neighbour graph is drawn among the clients that answered the setup stage (one that
      failed there never shared anything);
    - a client that drops out while keys are shared leaves the round: nobody masked against
      it, and Flower would ask its neighbours for shares of its secrets, which they never
      received (every client raises and the round is lost: ``tests/test_secagg.py``);
    - the server unmasks only when ``min_contributors`` masked updates arrived (distributed
      noise is calibrated to it).
    """

    def __init__(self, *args: int, min_contributors: int, **kwargs: float | int | None):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.min_contributors = min_contributors
        self.graph_drawn = False

    def _check_threshold(self, state: WorkflowState) -> bool:
        # Flower checks at the end of every stage; the first check ends the setup stage, when
        # who joined is known and nothing depends on the graph yet.
        if not self.graph_drawn:
            self.graph_drawn = True
            _draw_neighbours(state)
            neighbours = min(state.num_shares, len(state.active_node_ids))
            if 2 * state.threshold <= neighbours:
                log.error(
                    "reconstruction threshold %d is not more than half of %d neighbours: the "
                    "server could unmask single updates, so this round is not aggregated",
                    state.threshold,
                    neighbours,
                )
                return False
        return bool(super()._check_threshold(state))

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().share_keys_stage(grid, context, state):
            return False
        state.sampled_node_ids = set(state.active_node_ids)
        for node in state.nid_to_neighbours:
            state.nid_to_neighbours[node] &= state.active_node_ids
        return True

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        if len(state.active_node_ids) < self.min_contributors:
            log.warning(
                "%d masked updates arrived, fewer than secure_aggregation.min_contributors "
                "(%d): the sum is not unmasked (its noise would be too small)",
                len(state.active_node_ids),
                self.min_contributors,
            )
            return False
        return True


def _draw_neighbours(state: WorkflowState) -> None:
    """Flower's ring of ``num_shares`` neighbours, over the clients still in the round."""
    joined = list(state.active_node_ids)
    random.shuffle(joined)  # as Flower does: the graph is the server's choice, not a secret
    half = state.num_shares >> 1
    state.nid_to_neighbours = {
        node: {joined[(i + offset) % len(joined)] for offset in range(-half, half + 1)}
        for i, node in enumerate(joined)
    }
    state.sampled_node_ids = set(joined)


class _StageLog:
    """The grid the workflow talks through, keeping the replies of the masking stage (who
    sent a masked update, and its metrics)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.stages: list[list[Message]] = []

    @property
    def masking(self) -> list[Message]:
        return self.stages[2] if len(self.stages) > 2 else []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.stages.append(replies)
        return replies


class _OfferedCohort(LegacyStrategy):
    """The legacy strategy the workflow calls: it offers the cohort fedrec's strategy stack
    chose, as ``FitIns``, and keeps the unmasked mean the workflow hands back."""

    def __init__(self, sent: dict[int, Message], grid: Grid):
        self.sent = sent
        self.grid = grid
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.mean: list[np.ndarray] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        offered: list[tuple[ClientProxy, FitIns]] = []
        for node, message in self.sent.items():
            arrays = message.content.array_records["arrays"]
            config = dict(message.content.config_records["config"])
            config[ARRAY_KEYS] = json.dumps(list(arrays.keys()))
            fitins = FitIns(ndarrays_to_parameters(arrays.to_numpy_ndarrays()), config)  # type: ignore[arg-type]
            offered.append((GridClientProxy(node, self.grid, 0), fitins))
        return offered

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, bool | bytes | float | int | str]]:
        self.results = results
        if results:  # the workflow sets every result's parameters to the unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, *_: object) -> list[tuple[ClientProxy, object]]:
        return []

    def aggregate_evaluate(self, *_: object) -> tuple[float | None, dict[str, object]]:
        return None, {}

    def evaluate(self, *_: object) -> tuple[float, dict[str, object]] | None:
        return None
