"""The server's round loop: who a node is, who is sampled, and whose release a reply is."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrec.federation import CentralDPConfig, FederatedConfig
from server.rounds import IdentifiedGrid
from server.strategy import build_strategy

from .conftest import reply


class AnsweringGrid:
    """Nodes that answer the identify query with ``claims[node]`` (None: an error reply)."""

    def __init__(self, claims: dict[int, object]):
        self.claims = claims
        self.asked: list[int] = []
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.asked.append(node)
            TaskIdentity.node_id = node
            claim = self.claims[node]
            metrics = {} if claim is None else {"partition-id": claim}
            out.append(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message))
            TaskIdentity.node_id = 0
        return out


def test_nodes_are_ordered_by_client_and_bad_claims_are_excluded_once(caplog):
    grid = AnsweringGrid({71: 2, 12: 0, 55: 1, 90: 1, 30: 7, 44: None, 66: 1.5})
    identified = IdentifiedGrid(grid, timeout=1.0, clients=3)
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        assert identified.get_node_ids() == [12, 55, 71]  # clients 0, 1, 2
    assert identified.partition_of == {12: 0, 55: 1, 71: 2}
    # 90 claims a client 55 runs, 30 is out of range, 44 did not say, 66 not an int
    assert identified.excluded == {90, 30, 44, 66}
    assert caplog.text.count("excluded from sampling") == 4
    asked = len(grid.asked)
    assert identified.get_node_ids() == [12, 55, 71]
    assert len(grid.asked) == asked  # nobody is asked twice


@pytest.mark.timeout(20)
def test_a_round_without_user_level_dp_needs_only_a_cohort_online():
    """Five clients, two per round, three online: the round starts (it used to wait for all)."""
    strategy = build_strategy(FederatedConfig(clients_per_round=2), 5, seed=0)
    grid = AnsweringGrid({1: 0, 2: 1, 3: 2})
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    chosen = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(chosen) == 2 and {m.metadata.dst_node_id for m in chosen} <= {1, 2, 3}


def test_the_ledger_books_a_release_by_the_identified_client_not_by_the_reply(tmp_path):
    """A reply claiming to be another client is booked to the client its node runs."""
    from fedrec.config import parse_config
    from fedrec.population import population_of
    from server.federation import Federation

    config = parse_config(
        {
            "data": {"synthetic": {"num_users": 20, "num_items": 30, "seed": 0}},
            "model": {"name": "hstu", "max_len": 8, "embedding_dim": 8, "num_blocks": 1},
            "evaluation": {"ks": [10]},
            "federated": {
                "partitioning": "hash",
                "num_partitions": 3,
                "record_dp": {"noise_multiplier": 1.0},
                "central_dp": {"noise_multiplier": 1.0},
            },
        }
    )
    population = population_of(config)
    fed = FederatedConfig(central_dp=CentralDPConfig())
    strategy = build_strategy(fed, 3, seed=0)
    federation = Federation(
        population, population.publish(tmp_path), tmp_path, False, strategy, "test"
    )
    federation.partition_of = {11: 2}
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    instruction = Message(RecordDict(), dst_node_id=11, message_type=MessageType.TRAIN)
    lying = reply(instruction, ArrayRecord(), 1)
    lying.content["metrics"] = MetricRecord(
        {
            "partition-id": 0,
            "dp-steps": 3,
            "dp-noise-multiplier": 1.0,
            "dp-sample-rate": 0.5,
            "dp-clip-norm": 1.0,
            "dp-delta": 1e-5,
        }
    )
    TaskIdentity.node_id = 0
    federation.on_replies(1, [lying])
    assert {e.party for e in federation.ledger.events} == {"client:2", "server"}
