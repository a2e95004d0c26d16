"""Flower's SecAgg+ workflow as fedrec runs it (``server.secagg`` drives one per round): the
legacy strategy it needs, what it lacks for clients that fail or lie, and the check of every
reply before Flower reads it.

Flower 1.42's ``SecAggPlusWorkflow`` trusts its replies (a missing key, a list of the wrong
length or a misshapen masked vector crashes the server), asks for shares of clients that left
before masking (every client then raises and the round is lost), and draws the neighbour graph
before it knows who joined. ``SecAggPlus`` and ``CheckedStages`` close those gaps without
touching the protocol's cryptography, which stays Flower's.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Error, Message, MetricRecord
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedrec.federation.secure import ARRAY_KEYS

log = logging.getLogger("fedrec.server")
SETUP, SHARE_KEYS, MASKING, UNMASK = range(4)  # the workflow's calls to the grid, in order


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, plus what it lacks:

    - the neighbour graph is drawn among the clients that answered the setup stage (one that
      failed there never shared anything);
    - a client that fails while keys are shared leaves the round: nobody masked against it,
      and Flower would ask its neighbours for shares of its secrets, which they never
      received (``tests/test_secagg.py`` shows Flower's own workflow losing the round);
    - the server unmasks only when ``min_contributors`` masked updates arrived (distributed
      noise is calibrated to it).
    """

    def __init__(self, *args: int | float, min_contributors: int, **kwargs: float | int | None):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.min_contributors = min_contributors
        self.checks = 0

    def _check_threshold(self, state: WorkflowState) -> bool:
        # Flower checks at the end of every stage, so the count says which stage just ended.
        self.checks += 1
        if self.checks == 1:  # setup: who joined is known, nothing depends on the graph yet
            _draw_neighbours(state)
        elif self.checks == 2:  # keys shared: who failed since shared nothing anyone used
            state.sampled_node_ids = set(state.active_node_ids)
            for node in state.nid_to_neighbours:
                state.nid_to_neighbours[node] &= state.active_node_ids
        return bool(super()._check_threshold(state))

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


class CheckedStages:
    """The grid the workflow talks through. Every reply is checked before Flower reads it: the
    fields its stage needs, of the right types and lengths, node ids of the round, and at the
    masking stage one masked integer array per global array (plus the weight) of the right
    shape, and metrics ``metrics_problem`` accepts. A reply that fails becomes an error reply,
    so Flower treats its client as dropped out (and unmasks the sum without it). Keeps who
    failed and the masking stage's replies."""

    def __init__(
        self,
        grid: Grid,
        shapes: list[tuple[int, ...]],
        metrics_problem: Callable[[MetricRecord], str],
    ):
        self.grid = grid
        self.shapes = [(1,), *shapes]  # Flower puts the weight first
        self.metrics_problem = metrics_problem
        self.calls = 0
        self.nodes: set[int] = set()
        self.failed: set[int] = set()
        self.masking: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        stage, self.calls = self.calls, self.calls + 1
        asked = {m.metadata.dst_node_id: m for m in messages}
        if stage == SETUP:
            self.nodes = set(asked)
        checked = []
        for reply in self.grid.send_and_receive(list(asked.values()), timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in asked:
                continue
            problem = "" if reply.has_error() else self._problem(stage, reply)
            if problem:
                log.warning(
                    "node %d: SecAgg+ reply refused (%s): counted as dropped", node, problem
                )
                reply = Message(Error(ErrorCode.UNKNOWN, problem), reply_to=asked[node])
            checked.append(reply)
        answered = {r.metadata.src_node_id for r in checked if not r.has_error()}
        self.failed |= set(asked) - answered
        if stage == MASKING:
            self.masking = [r for r in checked if not r.has_error()]
        return checked

    def _problem(self, stage: int, reply: Message) -> str:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            return "no SecAgg+ record"
        try:
            if stage == SETUP:
                _expect(configs, {Key.PUBLIC_KEY_1: bytes, Key.PUBLIC_KEY_2: bytes})
            elif stage == SHARE_KEYS:
                destinations = _list(configs, Key.DESTINATION_LIST, int)
                if len(destinations) != len(_list(configs, Key.CIPHERTEXT_LIST, bytes)):
                    return "destinations and ciphertexts differ in length"
                if not set(destinations) <= self.nodes:
                    return "shares for nodes outside the round"
            elif stage == MASKING:
                return self._masking_problem(reply, _list(configs, Key.MASKED_PARAMETERS, bytes))
            elif stage == UNMASK:
                owners = _list(configs, Key.NODE_ID_LIST, int)
                if len(owners) != len(_list(configs, Key.SHARE_LIST, bytes)):
                    return "node ids and shares differ in length"
                if not set(owners) <= self.nodes:
                    return "shares of nodes outside the round"
        except (KeyError, TypeError, ValueError) as err:
            return str(err)
        return ""

    def _masking_problem(self, reply: Message, vectors: list[bytes]) -> str:
        if len(vectors) != len(self.shapes):
            return f"{len(vectors)} masked arrays for {len(self.shapes)}"
        for data, shape in zip(vectors, self.shapes, strict=True):
            array = bytes_to_ndarray(data)
            if array.shape != shape or array.dtype.kind not in "iu":
                return f"a masked array {array.dtype}{array.shape} is not int{shape}"
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        return self.metrics_problem(MetricRecord(dict(fitres.metrics)))  # type: ignore[arg-type]


def _expect(configs: Any, fields: dict[str, type]) -> None:
    for name, kind in fields.items():
        if not isinstance(configs[name], kind):
            raise TypeError(f"{name} is not {kind.__name__}")


def _list(configs: Any, name: str, kind: type) -> list[Any]:
    value = configs[name]
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{name} is not a list of {kind.__name__}")
    return value


class OfferedCohort(LegacyStrategy):
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
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        if results:  # the workflow sets every result's parameters to the unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None
