"""Vectorised FedSGD (``fedrec.federation.vectorised``) against its oracle, the per-client loop:
each client's state after its one SGD step, its reply (clipping, weight, loss), and a whole
federation of cohort nodes against one node per client."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from fedrec.config import parse_config
from fedrec.data.split import leave_one_out
from fedrec.data.synthetic import SyntheticConfig, generate_synthetic
from fedrec.federation import client as client_module
from fedrec.federation.client import train_round, train_shard
from fedrec.federation.config import FederatedConfig
from fedrec.federation.model import SequentialFederatedModel, local_train
from fedrec.federation.privacy import client_seed
from fedrec.federation.updates import NodeSum
from fedrec.federation.vectorised import batched_fedsgd_steps, fedsgd_shard, why_not_vectorised
from fedrec.models import build_model
from fedrec.models.hstu.model import HSTUConfig
from fedrec.models.sasrec.model import SASRecConfig
from fedrec.population import population_of
from fedrec.privacy import PrivacyLedger
from simulations.inprocess import run_inprocess

from .test_inprocess import _assert_close

FEDSGD = FederatedConfig(
    partitioning="user", local_epochs=1, local_optimizer="sgd", local_learning_rate=0.5
)


def _user_splits(count: int, seed: int = 0):
    """One split per user of a small synthetic population, the way user partitioning cuts it."""
    data = generate_synthetic(
        SyntheticConfig(num_users=count, num_items=40, mean_length=12, seed=seed)
    )
    whole = leave_one_out(data)
    return [whole.subset(np.array([u])) for u in range(count)], whole.num_items


def _model(kind: str, num_items: int):
    torch.manual_seed(3)
    if kind == "hstu":
        config = HSTUConfig(max_len=12, embedding_dim=8, num_blocks=2, dropout=0.0)
    else:
        config = SASRecConfig(max_len=12, embedding_dim=8, num_blocks=2, dropout=0.0)
    return build_model(kind, num_items, config)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_batched_fedsgd_equals_each_client_s_own_step(kind):
    splits, num_items = _user_splits(9)
    model = _model(kind, num_items)
    seeds = [client_seed(0, 2, p) for p in range(len(splits))]
    batched = fedsgd_shard(model, splits, FEDSGD.local_learning_rate, seeds, chunk=4)
    assert batched is not None
    global_state = copy.deepcopy(model.state_dict())
    for split, seed, (state, result) in zip(splits, seeds, batched, strict=True):
        model.load_state_dict(global_state)
        expected = local_train(model, split, FEDSGD, seed)
        assert result.num_examples == expected.num_examples > 0
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        for key, tensor in model.state_dict().items():
            assert torch.allclose(state[key], tensor, atol=1e-6), key
        assert any(not torch.equal(state[k], global_state[k]) for k in state)  # it moved
    model.load_state_dict(global_state)
    for key, tensor in model.state_dict().items():  # the shard left the global weights alone
        assert torch.equal(tensor, global_state[key])


def test_replies_equal_train_round_with_clipping_and_an_empty_client():
    splits, num_items = _user_splits(6, seed=1)
    empty = splits[0].subset(np.array([], dtype=np.int64))
    splits = [*splits, empty]
    fed = dataclasses.replace(FEDSGD, report_train_loss=True)
    model = SequentialFederatedModel(_model("hstu", num_items))
    global_state = copy.deepcopy(model.shared_state())
    partitions = list(range(10, 10 + len(splits)))
    shard = train_shard(
        model, splits, fed, partitions=partitions, round_number=4, seed=7, clipping_norm=0.05
    )
    assert shard is not None
    for partition, split, reply in zip(partitions, splits, shard, strict=True):
        model.load_shared_state(global_state)
        expected = train_round(
            model,
            split,
            fed,
            partition=partition,
            round_number=4,
            seed=7,
            ledger=PrivacyLedger(),
            personal=None,
            clipping_norm=0.05,
        )
        assert reply.metrics.keys() == expected.metrics.keys()
        for name, value in expected.metrics.items():
            assert reply.metrics[name] == pytest.approx(value, rel=1e-5, nan_ok=True), name
        assert reply.state is not None and expected.state is not None
        update = torch.sqrt(
            sum(((reply.state[k] - global_state[k]) ** 2).sum() for k in reply.state)
        )
        assert float(update) <= 0.05 + 1e-6
        for key, tensor in expected.state.items():
            assert torch.allclose(reply.state[key], tensor, atol=1e-6), key
    assert shard[-1].metrics["num-examples"] == 0


def test_what_cannot_be_vectorised_says_why():
    splits, num_items = _user_splits(4)
    model = SequentialFederatedModel(_model("hstu", num_items))
    assert why_not_vectorised(model, FEDSGD) is None
    adam = dataclasses.replace(FEDSGD, local_optimizer="adam")
    assert "more than one SGD step" in str(why_not_vectorised(model, adam))
    epochs = dataclasses.replace(FEDSGD, local_epochs=2)
    assert "more than one SGD step" in str(why_not_vectorised(model, epochs))
    record = dataclasses.replace(FEDSGD, record_dp={"noise_multiplier": 1.0})
    assert "Opacus" in str(why_not_vectorised(model, record))
    shared = dataclasses.replace(FEDSGD, partitioning="hash", num_partitions=2)
    assert "several users" in str(why_not_vectorised(model, shared))
    pair = leave_one_out(generate_synthetic(SyntheticConfig(num_users=2, num_items=40, seed=0)))
    assert fedsgd_shard(model.model, [splits[0], pair], 1.0, [0, 1]) is None  # 2 users: 2 rows


CONFIG = {
    "seed": 2,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 24, "num_items": 50, "mean_length": 14, "seed": 0},
    },
    "model": {"name": "hstu", "max_len": 12, "embedding_dim": 8, "num_blocks": 1, "dropout": 0.0},
    "evaluation": {"ks": [10]},
    "federated": {
        "partitioning": "user",
        "num_rounds": 3,
        "clients_per_round": 12,
        "local_epochs": 1,
        "local_optimizer": "sgd",
        "local_learning_rate": 1.0,
        "strategy": "fedadam",
        "server_learning_rate": 0.01,
        "reproducible_noise": True,
        "report_train_loss": True,
    },
}


@pytest.mark.parametrize(
    "central_dp",
    [
        None,
        {"noise_multiplier": 0.8, "clipping_norm": 0.3},
        {
            "noise_multiplier": 0.8,
            "clipping_norm": 0.05,
            "sampling": "poisson",
            "adaptive_clipping": {"target_quantile": 0.5, "learning_rate": 0.5},
        },
    ],
    ids=["no DP", "user-level DP", "user-level DP, Poisson, adaptive clipping"],
)
def test_a_vectorised_cohort_federation_equals_one_node_per_client(
    tmp_path, monkeypatch, central_dp
):
    """Under user-level DP the cohort nodes send the sums of their clients' clipped updates
    (``fedrec.federation.updates``), and the server adds them up: the same model, to 1e-5."""
    shards: list[int] = []
    sums: list[int] = []

    def counted(model, splits, *args, **kwargs):
        shards.append(len(splits))
        return batched_fedsgd_steps(model, splits, *args, **kwargs)

    def summed(self, values):
        sums.append(1)
        return NodeSum_add(self, values)

    NodeSum_add = NodeSum.add
    monkeypatch.setattr(client_module, "batched_fedsgd_steps", counted)
    monkeypatch.setattr(NodeSum, "add", summed)
    runs = {}
    for users_per_node in (1, 10):
        data = copy.deepcopy(CONFIG)
        data["federated"]["users_per_node"] = users_per_node
        if central_dp:
            data["federated"]["central_dp"] = central_dp
        folder = tmp_path / f"nodes-of-{users_per_node}"
        data["output_dir"] = str(folder)
        run_inprocess(population_of(parse_config(data, "vectorised")), folder, progress=False)
        runs[users_per_node] = (
            torch.load(folder / "checkpoint.pt", weights_only=True)["model"],
            [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()],
        )
    assert shards and max(shards) <= 10  # the cohort run trained in shards (nodes of 10)
    assert bool(sums) == (central_dp is not None)  # under user-level DP, nodes sent sums
    (single, single_lines), (cohort, cohort_lines) = runs[1], runs[10]
    for key, tensor in single.items():
        assert torch.allclose(tensor, cohort[key], atol=1e-5), key
    _assert_close(  # floats to 1e-6: the batched loss sums in another order
        [{k: v for k, v in line.items() if k != "seconds"} for line in cohort_lines],
        [{k: v for k, v in line.items() if k != "seconds"} for line in single_lines],
        rel=1e-6,
    )
