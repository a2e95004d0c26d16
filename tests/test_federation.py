"""Partitioning, client views and local training: the library side of a federated run."""

from collections import Counter

import numpy as np
import pytest

from fedrec.data.partition import partition_users
from fedrec.data.records import record_spans
from fedrec.federation import FederatedConfig, event_windows, local_train, record_shape
from fedrec.models import build_model, model_config
from fedrec.privacy.dp_sgd import DPSGDConfig

from .conftest import make_dataset


def test_partitions_cover_every_user_exactly_once():
    rows = [(u, i, float(i)) for u in range(30) for i in range(4)]
    ds = make_dataset(rows)
    ds.user_features["gender"] = np.array(["F", "M", "X"] * 10, dtype=object)
    for scheme, kwargs in [
        ("user", {}),
        ("hash", {"num_partitions": 4}),
        ("attribute", {"attribute": "gender"}),
    ]:
        parts = partition_users(ds, scheme, **kwargs)
        assert sorted(np.concatenate(parts).tolist()) == list(range(30)), scheme
    assert len(partition_users(ds, "attribute", attribute="gender")) == 3
    # hashing is a pure function of the raw id: the same in every process
    assert [p.tolist() for p in partition_users(ds, "hash", 4)] == [
        p.tolist() for p in partition_users(ds, "hash", 4)
    ]
    with pytest.raises(ValueError, match="not a user attribute"):
        partition_users(ds, "attribute", attribute="age")


def test_client_view_holds_only_its_users(small_split):
    users = np.array([4, 1, 9])
    view = small_split.subset(users)
    assert view.num_users == 3 and view.num_items == small_split.num_items
    for local, user in enumerate(users):
        assert view.full(local)[0].tolist() == small_split.full(user)[0].tolist()
    assert len(view.items) == sum(len(small_split.full(u)[0]) for u in users)


def _records(items: np.ndarray, times: np.ndarray, window: int, period: int) -> list[tuple]:
    return [tuple(items[a:b].tolist()) for a, b in record_spans(times, window, period)]


@pytest.mark.parametrize("window, period", [(3, 100), (4, 86400), (20, 3600)])
def test_removing_any_one_event_changes_at_most_one_record(window, period):
    """The unit is honest: for every user and every event, deleting that event changes at most
    one record (one removed and/or one added), the factor the ledger's ε assumes (1)."""
    rng = np.random.default_rng(0)
    worst = 0
    for _ in range(60):
        n = int(rng.integers(2, 60))
        gaps = rng.choice([0, 1, 30, 500, 5000, 90000], size=n, p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
        times = np.cumsum(gaps) + int(rng.integers(0, 10**9))
        items = rng.integers(1, 1000, size=n)
        before = Counter(_records(items, times, window, period))
        for drop in range(n):
            keep = np.arange(n) != drop
            after = Counter(_records(items[keep], times[keep], window, period))
            removed, added = sum((before - after).values()), sum((after - before).values())
            assert removed <= 1 and added <= 1
            worst = max(worst, removed, added)
    assert worst == 1  # and events really do change records


def test_records_are_next_item_pairs_of_one_period_each(small_split):
    window = 4
    user = int(np.argmax(small_split.history_lengths("valid")))  # the longest history
    inputs, times, targets = event_windows(small_split, np.array([user]), window, 86400).tensors
    assert inputs.shape[1] == window and len(inputs) >= 1
    history = (small_split.train_sequence(user)[0] + 1).tolist()
    for row in range(len(inputs)):
        valid = targets[row] > 0
        assert targets[row][valid][:-1].tolist() == inputs[row][valid][1:].tolist()
        chunk = [*inputs[row][valid].tolist(), targets[row][valid][-1].item()]
        assert len(chunk) <= window + 1
        assert any(history[i : i + len(chunk)] == chunk for i in range(len(history)))
        assert len(set((times[row][valid] // 86400).tolist())) == 1  # one calendar day


@pytest.mark.parametrize("dp", [False, True])
def test_local_training_moves_the_model_and_reports_dp_parameters(small_split, dp):
    config = FederatedConfig(
        local_epochs=2,
        local_learning_rate=0.01,
        record_window=5,
        record_dp=DPSGDConfig(noise_multiplier=0.5, batch_size=2) if dp else None,
    )
    model = build_model(
        "sasrec", small_split.num_items, model_config("sasrec", {"max_len": 10, "embedding_dim": 8})
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_train(model, small_split.subset(np.array([2])), config, seed=0)
    assert any(not (before[k] == v).all() for k, v in model.state_dict().items())
    assert result.num_examples > 0 and np.isfinite(result.loss)
    if dp:
        assert result.dp is not None and result.dp.steps == 2 * round(1 / result.dp.sample_rate)
        assert result.dp.noise_multiplier == 0.5
    else:
        assert result.dp is None


def test_federated_config_validation():
    with pytest.raises(ValueError, match="strategy"):
        FederatedConfig(strategy="fedsgd")
    with pytest.raises(ValueError, match="record_dp"):
        FederatedConfig(record_epsilon_budget=3.0)
    assert record_shape(FederatedConfig(partitioning="hash")).unit == "user-within-silo"
    assert record_shape(FederatedConfig()).unit == "user-day"


def test_clients_per_round_is_a_count_or_a_fraction():
    from fedrec.federation import FederatedConfig

    assert FederatedConfig(clients_per_round=10).sampled_clients(943) == 10
    assert FederatedConfig(clients_per_round=10).sampled_clients(4) == 4
    assert FederatedConfig(fraction_per_round=0.1).sampled_clients(943) == 94
    assert FederatedConfig(fraction_per_round=0.001).sampled_clients(100) == 1
    with pytest.raises(ValueError, match="fraction_per_round"):
        FederatedConfig(fraction_per_round=1.5)


def test_a_round_where_nobody_trained_keeps_the_global_model():
    """Refusing clients reply with num-examples 0; if all do, Flower's weighted mean would
    divide by zero: the keeper returns no new arrays and the model stays."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from server.strategy import LedgerKeeper
    from simulations.inprocess import InProcessGrid

    from .conftest import reply as _reply

    seen: list[int] = []
    keeper = LedgerKeeper(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3),
        lambda _round, replies: seen.append(len(replies)),
    )
    arrays = ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})
    instructions = list(keeper.configure_train(1, arrays, ConfigRecord(), InProcessGrid(3)))
    assert keeper.aggregate_train(1, [_reply(m, arrays, 0) for m in instructions]) == (None, None)
    assert seen == [3]  # the ledger still saw every reply
    moved = ArrayRecord({"w": Array(np.full(2, 3.0, dtype=np.float32))})
    replies = [
        _reply(m, moved if i == 0 else arrays, 1 if i == 0 else 0)
        for i, m in enumerate(instructions)
    ]
    aggregated, _ = keeper.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["w"].numpy(), [3.0, 3.0])  # only the client that trained
