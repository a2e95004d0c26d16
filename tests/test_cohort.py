"""Cohort nodes: a federation whose nodes each host several clients computes what one node per
client computes: the same global model, ledger, ε and round lines (in the reproducible mode),
with each DP level, budget refusals, partial participation and the federated audit."""

from __future__ import annotations

import copy

import pytest
import torch

from fedrec.config import parse_config
from fedrec.errors import FedrecConfigError
from fedrec.federation.cohort import hosted_clients, node_count
from fedrec.population import population_of
from simulations.inprocess import run_inprocess

from .test_inprocess import CONFIG, _assert_close, _events, _lines

DP_LEVELS = {
    "record and user level": {},
    "record level": {"central_dp": None},
    "user level, fixed cohort": {
        "record_dp": None,
        "record_epsilon_budget": None,
        "central_dp": {"noise_multiplier": 0.5, "clipping_norm": 0.5, "sampling": "fixed"},
    },
    "none": {"record_dp": None, "record_epsilon_budget": None, "central_dp": None},
}


def _run(tmp_path, name: str, federated: dict, users_per_node: int) -> dict:
    data = copy.deepcopy(CONFIG)
    data["federated"].update(federated, users_per_node=users_per_node)
    data["federated"] = {k: v for k, v in data["federated"].items() if v is not None}
    if "record_dp" not in data["federated"]:
        data["audit"]["exposure_noise"] = 0.0  # (its noise is a record-level release)
    folder = tmp_path / f"{name}-{users_per_node}"
    data["output_dir"] = str(folder)
    run_inprocess(population_of(parse_config(data, name)), folder, progress=False)
    return {
        "model": torch.load(folder / "checkpoint.pt", weights_only=True)["model"],
        "events": _events(folder),
        "metrics": _lines(folder / "metrics.jsonl"),
        "audit": _lines(folder / "audit.jsonl"),
    }


@pytest.mark.parametrize("level", DP_LEVELS)
def test_cohort_nodes_give_the_federation_of_one_node_per_client(tmp_path, level):
    federated = DP_LEVELS[level]
    single = _run(tmp_path, "single", federated, 1)
    cohort = _run(tmp_path, "cohort", federated, 4)  # 6 clients: nodes of 4 and 2
    for key, tensor in single["model"].items():
        assert torch.allclose(tensor, cohort["model"][key], atol=1e-5), key
    assert cohort["events"] == single["events"]
    assert any("dp" in str(e) for e in single["events"]) or level == "none"
    _assert_close(cohort["metrics"], single["metrics"], "metrics")
    _assert_close(cohort["audit"], single["audit"], "audit")
    if level == "record and user level":  # budget refusals and partial participation happened
        refused = sum(
            line.get("refused", 0) + line.get("withheld", 0) for line in single["metrics"]
        )
        clients = [line.get("clients") for line in single["metrics"] if "clients" in line]
        assert refused > 0 and len(set(clients)) > 1


def test_nodes_host_contiguous_shards_and_secagg_is_refused():
    assert node_count(10, 4) == 3
    assert [list(hosted_clients(n, 4, 10)) for n in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    with pytest.raises(ValueError, match="outside"):
        hosted_clients(3, 4, 10)
    data = copy.deepcopy(CONFIG)
    data["federated"].update(
        users_per_node=4, secure_aggregation={"min_contributors": 3}, record_dp=None
    )
    data["federated"].pop("record_epsilon_budget")
    with pytest.raises(FedrecConfigError, match="SecAgg"):
        parse_config(data, "cohort.yaml")


def test_a_clients_error_stays_its_own_and_missing_clients_are_warned_about(caplog):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.federation.cohort import COHORT_CLIENTS, HOSTED, reply_key
    from server.cohort import CohortGrid

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0

    class Node:  # one real node (id 50) hosting clients 4 and 5 of 8
        def get_node_ids(self) -> list[int]:
            return [50]

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            replies = []
            for m in messages:
                config = m.content.config_records["config"]
                if COHORT_CLIENTS not in config:  # the roster query
                    content = RecordDict({"config": ConfigRecord({HOSTED: [4, 5]})})
                else:
                    content = RecordDict(
                        {
                            reply_key("metrics", 4): MetricRecord({"partition-id": 4}),
                            reply_key("error", 5): ConfigRecord({"reason": "ValueError: boom"}),
                        }
                    )
                replies.append(Message(content, reply_to=m))
            return replies

    grid = CohortGrid(Node(), users_per_node=2, clients=8, timeout=10)
    virtual = grid.get_node_ids()
    assert [grid.virtual[v] for v in virtual] == [(50, 4), (50, 5)]
    assert "host 2 of the 8 clients" in caplog.text
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
    sent = [Message(shared, dst_node_id=v, message_type=MessageType.TRAIN) for v in virtual]
    first, second = grid.send_and_receive(sent)
    assert first.metadata.src_node_id == virtual[0] and not first.has_error()
    assert first.content.metric_records["metrics"]["partition-id"] == 4
    assert second.metadata.src_node_id == virtual[1] and second.has_error()
    assert "boom" in second.error.reason


def test_cohort_clients_are_identified_from_the_rosters_which_bring_the_catalogue(caplog):
    """No client is asked who it is: the rosters say it (two nodes claiming one client: the
    second is excluded, as a node claiming a taken client is) and carry the published catalogue."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.federation.cohort import HOSTED
    from server.cohort import CohortGrid
    from server.rounds import IdentifiedGrid

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    sent: list[Message] = []
    rosters = {50: [0, 1], 60: [1, 2]}

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return [50, 60]

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            sent.extend(messages)
            return [
                Message(
                    RecordDict({"config": ConfigRecord({HOSTED: rosters[m.metadata.dst_node_id]})}),
                    reply_to=m,
                )
                for m in messages
            ]

    catalogue = '{"content_hash": "abc"}'
    cohorts = CohortGrid(Nodes(), users_per_node=2, clients=3, timeout=10)
    nodes = IdentifiedGrid(cohorts, 10, 3, catalogue=catalogue, config="seed: 0")
    identified = nodes.get_node_ids()
    assert [nodes.partition_of[v] for v in identified] == [0, 1, 2]
    assert "excluded from sampling: it answered a client another node runs" in caplog.text
    assert [m.metadata.message_type for m in sent] == ["query.cohort", "query.cohort"]
    published = sent[0].content.config_records["published"]
    assert published["catalogue"] == catalogue and published["catalogue-hash"] == "abc"
    assert nodes.get_node_ids() == identified and len(sent) == 2  # asked once


def test_a_nodes_sum_counts_as_its_updates_and_one_past_count_times_c_is_dropped(caplog):
    """The server adds a node's sum of clipped updates as that many updates, never more than
    count·C of them; the validator refuses a sum without its count, or beside arrays."""
    import numpy as np
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.federation.arrays import state_record
    from fedrec.federation.cohort import NODE_SUM, NODE_SUM_FACTS
    from server.dp import UserLevelDP
    from server.sampling import round_generator
    from server.validation import ReplyValidator

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0

    def reply(total: float | None, count: int | None, arrays: bool = False) -> Message:
        content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
        if total is not None:
            content[NODE_SUM] = state_record({"w": np.full(4, total / 2)})  # norm: total
        if count is not None:
            content[NODE_SUM_FACTS] = MetricRecord({"count": count})
        if arrays:
            content["arrays"] = state_record({"w": np.zeros(4, dtype=np.float32)})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    released: list[np.ndarray] = []

    class Keep:
        def aggregate_train(self, _round, replies):  # type: ignore[no-untyped-def]
            released.append(replies[0].content.array_records["arrays"]["w"].numpy())
            return None, None

    dp = UserLevelDP(Keep(), 0.0, 1.0, 10, 100, "fixed", round_generator(0))  # type: ignore[arg-type]
    dp.keys, dp.current = ["w"], [np.zeros(4, dtype=np.float32)]
    _, metrics = dp.aggregate_train(1, [reply(3.0, 3), reply(5.0, 2), reply(None, None)])
    assert metrics is not None and metrics["dp-replies"] == 3  # the second sum: 5 > 2·C
    assert "has norm 5 > 2 × C" in caplog.text
    assert np.allclose(released[0], 1.5 / 10)  # (3/2 per coordinate) / the expected cohort

    validator = ReplyValidator(None, weighted=False, check_norm=False, node_sums=True)  # type: ignore[arg-type]
    validator.current = {"w": np.zeros(4, dtype=np.float32)}
    assert validator._inspect(reply(None, None))[0] == ""  # its update is in its node's sum
    assert validator._inspect(reply(3.0, 3))[0] == ""
    assert "count" in validator._inspect(reply(3.0, None))[0]
    assert "both" in validator._inspect(reply(3.0, 3, arrays=True))[0]
    plain = ReplyValidator(None, weighted=False, check_norm=False)  # type: ignore[arg-type]
    plain.current = validator.current
    assert "no arrays" in plain._inspect(reply(None, None))[0]  # without node sums
