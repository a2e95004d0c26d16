"""A client runs with its own store and the published catalogue only: never the population."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

import fedrec.population
from clients.app import app as client_app
from fedrec.config import parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.store import EventStore, RawEvents
from fedrec.federated_models import build_federated_model
from fedrec.federation.layout import CATALOGUE_FILE
from fedrec.population import population_of

CONFIG = {
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 30, "num_items": 40, "mean_length": 20, "seed": 0},
    },
    "model": {"name": "hstu", "max_len": 16, "embedding_dim": 8, "num_blocks": 1},
    "evaluation": {"ks": [10]},
    "audit": {"mode": "federated", "metrics": ["NDCG@10"], "exposure_noise": 8.0},
    "federated": {
        "partitioning": "hash",
        "num_partitions": 3,
        "record_dp": {"noise_multiplier": 1.0, "batch_size": 4},
    },
}


def _message(kind: str, content: RecordDict) -> Message:
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    return Message(content, dst_node_id=1, message_type=kind)


def _ask(message: Message, context: Context) -> Message:
    TaskIdentity.node_id = 1  # the reply's sender
    try:
        return client_app(message, context)
    finally:
        TaskIdentity.node_id = 0


def test_a_device_trains_and_audits_from_its_own_store_and_the_published_catalogue(
    tmp_path, monkeypatch, caplog
):
    population = population_of(parse_config(CONFIG))
    server = tmp_path / "server"
    catalogue = population.publish(server)  # the server's start of a run
    device = tmp_path / "device"
    population.write_store(device / "store", 0)  # what the device collected: its own events
    store = EventStore(device / "store")
    own = store.events()
    EventStore.write(  # and an event of an item newer than the catalogue
        device / "store",
        RawEvents(
            np.append(own.users, own.users[0]),
            np.append(own.items, "item-from-the-future"),
            np.append(own.timestamps, own.timestamps.max() + 1),
        ),
        store.user_attributes(),
    )
    # The device's copy of the experiment config reaches no data, and building a population in
    # this process fails: the client must not need either.
    on_device = {**CONFIG, "data": {"source": "recbole", "path": str(tmp_path / "nowhere")}}
    (device / "experiment.yaml").write_text(yaml.safe_dump(on_device), encoding="utf-8")

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a client built the population")

    monkeypatch.setattr(fedrec.population, "population_of", forbidden)
    monkeypatch.setattr(fedrec.population, "prepare_split", forbidden)
    context = Context(
        run_id=0,
        node_id=1,
        node_config={
            "partition-id": 0,
            "store": str(device / "store"),
            "catalogue": str(device / CATALOGUE_FILE),
            "ledger-dir": str(device),
        },
        state=RecordDict(),
        run_config={"config": str(device / "experiment.yaml"), "run-dir": str(tmp_path / "run")},
    )
    published = (server / CATALOGUE_FILE).read_text(encoding="utf-8")
    announced = {"catalogue": published, "catalogue-hash": catalogue.content_hash}
    query = _message(MessageType.QUERY, RecordDict({"config": ConfigRecord(announced)}))
    assert _ask(query, context).content["metrics"]["partition-id"] == 0
    assert ItemCatalogue.load(device / CATALOGUE_FILE).content_hash == catalogue.content_hash

    global_state = build_federated_model(population.config, catalogue, server).shared_state()
    sent = {"server-round": 1, "catalogue-hash": catalogue.content_hash}
    content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord(sent)})
    with caplog.at_level(logging.WARNING, logger="fedrec.data.store"):
        trained = _ask(_message(MessageType.TRAIN, content), context)
    assert not trained.has_error(), trained.error
    assert "skipped 1 event(s) of 1 distinct item(s) not in catalogue" in caplog.text
    metrics = trained.content["metrics"]
    assert metrics["dp-steps"] > 0 and metrics["num-examples"] == 1
    arrays = trained.content["arrays"].to_torch_state_dict()
    assert arrays.keys() == global_state.keys()
    assert any(not np.array_equal(arrays[k].numpy(), global_state[k].numpy()) for k in arrays)
    ledger = json.loads((device / "client-0.json").read_text(encoding="utf-8"))
    assert [e["mechanism"] for e in ledger["events"]] == ["dp-sgd"]

    evaluated = _ask(_message(MessageType.EVALUATE, content), context)
    assert not evaluated.has_error(), evaluated.error
    assert evaluated.content["metrics"]["audit-exposure-released"] == 1
    assert len(evaluated.content["metrics"]["audit/exposure"]) == catalogue.num_items
    assert not (tmp_path / "run").exists()  # nothing written outside the device's own folder

    stale = RecordDict(
        {
            "arrays": ArrayRecord(global_state),
            "config": ConfigRecord({**sent, "catalogue-hash": "0"}),
        }
    )
    with pytest.raises(ValueError, match=r"fetch the server's catalogue\.json again"):
        _ask(_message(MessageType.TRAIN, stale), context)  # Flower replies with this error


def test_a_tampered_catalogue_is_not_kept(tmp_path):
    population = population_of(parse_config(CONFIG))
    population.publish(tmp_path)
    document = json.loads((tmp_path / CATALOGUE_FILE).read_text(encoding="utf-8"))
    document["raw_item_ids"][0] = "swapped"
    from fedrec.data.catalogue import keep_catalogue
    from fedrec.errors import FedrecDataError

    with pytest.raises(FedrecDataError, match="modified or truncated"):
        keep_catalogue(json.dumps(document), tmp_path / "device" / CATALOGUE_FILE)
    assert not (tmp_path / "device" / CATALOGUE_FILE).exists()
