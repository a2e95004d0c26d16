"""The server's round loop: who a node is, who is sampled, and whose release a reply is."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrec.federation import FederatedConfig
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


def _federation(tmp_path, resume: bool = False):
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
    strategy = build_strategy(config.federated, 3, seed=0)
    return Federation(population, population.publish(tmp_path), tmp_path, resume, strategy, "test")


def _release(node: int, claimed: int):
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    out = reply(instruction, ArrayRecord(), 1)
    out.content["metrics"] = MetricRecord(
        {
            "partition-id": claimed,
            "dp-steps": 3,
            "dp-noise-multiplier": 1.0,
            "dp-sample-rate": 0.5,
            "dp-clip-norm": 1.0,
            "dp-delta": 1e-5,
        }
    )
    TaskIdentity.node_id = 0
    return out


def test_the_ledger_books_a_release_by_the_identified_client_not_by_the_reply(tmp_path):
    """A reply claiming to be another client is booked to the client its node runs."""
    federation = _federation(tmp_path)
    federation.partition_of = {11: 2}
    federation.on_replies(1, [_release(11, claimed=0)])
    assert {e.party for e in federation.ledger.events} == {"client:2", "server"}


def test_releases_of_an_interrupted_round_survive_the_resume(tmp_path):
    """Killed after round 2's replies arrived, before its checkpoint: the resumed server's
    ledger still holds round 2's releases (the clients spent them)."""
    federation = _federation(tmp_path)
    federation.partition_of = {11: 0, 12: 1}
    federation.on_replies(1, [_release(11, 0)])
    federation.checkpoint(1)
    federation.on_replies(2, [_release(11, 0), _release(12, 1)])  # then the process dies
    resumed = _federation(tmp_path, resume=True)
    assert resumed.rounds_done == 1
    rounds = sorted((e.round, e.party) for e in resumed.ledger.events)
    # round 2's aggregate was never published: the server's own release of it is not kept
    assert rounds == [(1, "client:0"), (1, "server"), (2, "client:0"), (2, "client:1")]


def test_a_device_that_loses_its_ledger_is_not_asked_past_its_budget(tmp_path):
    """Each device forgets its ledger before every round; the server's ledger still keeps every
    client within record_epsilon_budget."""
    import json
    import shutil

    import yaml

    from clients.app import app as client_app
    from fedrec.config import parse_config
    from fedrec.population import population_of
    from server.rounds import run_federation
    from simulations.inprocess import InProcessGrid

    config = parse_config(
        {
            "seed": 0,
            "data": {"synthetic": {"num_users": 30, "num_items": 40, "mean_length": 30, "seed": 0}},
            "model": {"name": "hstu", "max_len": 16, "embedding_dim": 8, "num_blocks": 1},
            "evaluation": {"ks": [10]},
            "audit": {"enabled": False},
            "federated": {
                "partitioning": "hash",
                "num_partitions": 3,
                "num_rounds": 4,
                "clients_per_round": 3,
                "record_dp": {"noise_multiplier": 1.0, "batch_size": 8},
                "record_epsilon_budget": 6.0,  # one round each, then refusal
            },
        }
    )
    population = population_of(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")

    class Forgetful(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            shutil.rmtree(tmp_path / "devices", ignore_errors=True)  # every device forgets
            return super().send_and_receive(messages, timeout=timeout)

    grid = Forgetful(
        3,
        client_app,
        {"config": str(tmp_path / "config.yaml"), "run-dir": str(tmp_path)},
        population,
        tmp_path,
    )
    run_federation(population, tmp_path, grid, engine="in-process", write_stores=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert sum(line["withheld"] for line in lines) > 0
    assert all(line["epsilon"]["client_max"] <= 6.0 for line in lines)
