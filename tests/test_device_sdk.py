"""The device SDK: three devices, each one MovieLens-100K user's history in an encrypted store,
run a federation through the ClientApp (in process, over the deployment's round loop with an
enrolment); then what a device holds, shows, exports and forgets."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fedrec.device
from clients.device import open_device
from fedrec.config import parse_config
from fedrec.data import load_dataset
from fedrec.data.catalogue import ItemCatalogue
from fedrec.device import ParticipationPolicy
from fedrec.device.client import BUNDLE, EVENT, dataset_attributes, dataset_history
from fedrec.device.store import DATABASE
from fedrec.errors import FedrecDataError
from fedrec.federated_models import initial_federated_model
from fedrec.federation.layout import CATALOGUE_FILE, client_paths
from fedrec.population import population_of
from fedrec.serving.bundle import BUNDLE_DIR, MANIFEST_FILE, ModelBundle, bundle_hash
from server.rounds import IdentifiedGrid, run_federation
from simulations.inprocess import InProcessGrid

from .conftest import FirstNodes
from .tiny import TINY_LLM

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
USERS = ("196", "405", "13")  # 405 is the heaviest user (737 ratings)
CONFIG = {
    "seed": 0,
    "data": {"source": "recbole", "path": str(ML100K), "name": "ml-100k"},
    "model": {"name": "hstu", "max_len": 50, "embedding_dim": 16, "num_blocks": 1},
    "audit": {"enabled": False},
    "federated": {
        "partitioning": "user",
        "num_rounds": 2,
        "clients_per_round": 3,
        "local_epochs": 1,
        "record_window": 10,
        "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "record_epsilon_budget": 10.0,
    },
}


def _key(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Three enrolled devices after a two-round federation: (run folder, device folders, keys,
    server results)."""
    root = tmp_path_factory.mktemp("devices")
    config = parse_config(dict(CONFIG, output_dir=str(root / "run")), "test")
    population = population_of(config)
    folders, keys, configs = [], [], {}
    for client, user in enumerate(USERS):
        folder, key = root / f"device-{user}", _key(root / f"device-{user}.key")
        with fedrec.device.open(folder, key.read_bytes()) as device:
            device.record_many(dataset_history(population.dataset, user))
        folders.append(folder)
        keys.append(key)
        configs[client] = {"store": str(folder), "key-file": str(key)}
    from clients.app import app

    grid = InProcessGrid(len(population.partitions), app, {}, node_configs=configs)
    # the enrolment: node ID (partition + 1 in process) -> client; other nodes are strangers
    enrolment = {client + 1: client for client in range(len(USERS))}
    results = run_federation(
        population, root / "run", FirstNodes(grid, 3), write_stores=False, enrolment=enrolment
    )
    return root / "run", folders, keys, results


def test_devices_train_and_recommend_from_their_own_stores(deployed):
    run_dir, folders, keys, results = deployed
    assert results["rounds"] == 2 and not results["stopped_early"]
    manifest = json.loads((run_dir / BUNDLE_DIR / MANIFEST_FILE).read_text())
    assert manifest["version"] == 2
    for client, (folder, key) in enumerate(zip(folders, keys, strict=True)):
        with fedrec.device.open(folder, key.read_bytes()) as device:
            assert device.enrolment() == client
            bundle = device.bundle()
            assert bundle is not None and bundle.version == 2
            assert bundle.content_hash == manifest["content_hash"]  # the server's final model
            ledger = device.ledger()
            rounds = sorted(e.round for e in ledger.events)
            assert rounds == [1, 2]
            epsilon = ledger.epsilon(f"client:{client}", ledger.events[0].delta)
            assert 0 < epsilon <= 10.0
            assert f"ε = {epsilon:.3g}" in device.privacy_statement()
            top = device.recommend(10)
            seen = set(device.events().items.tolist())
            assert len(top) == 10 and len({r.item for r in top}) == 10
            assert not seen & {r.item for r in top}
            assert all(r.title for r in top)
    # the server booked each release under the enrolled client, and the model moved
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    booked = {
        (e["party"], e["round"])
        for e in checkpoint["ledger"]["events"]
        if e["mechanism"] == "dp-sgd"
    }
    assert booked == {(f"client:{c}", r) for c in range(3) for r in (1, 2)}
    config = parse_config(dict(CONFIG, output_dir=str(run_dir)), "test")
    catalogue = ItemCatalogue.load(run_dir / CATALOGUE_FILE)
    initial = initial_federated_model(config, catalogue, run_dir).shared_state()
    final = bundle.state
    assert any(not torch.equal(initial[k], final[k]) for k in initial)  # the model moved


def test_nothing_about_the_user_is_readable_in_a_devices_files(deployed, tmp_path):
    _, folders, keys, _ = deployed
    dataset = load_dataset(parse_config(CONFIG, "test").data)
    titles = dataset.item_features["title"]
    index = {str(r): i for i, r in enumerate(dataset.raw_item_ids.tolist())}
    for user, folder in zip(USERS, folders, strict=True):
        raw = b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())
        history = dataset_history(dataset, user)
        for item, timestamp, *_ in history[:30]:
            assert str(timestamp).encode() not in raw
            assert titles[index[item]].encode() not in raw
        assert b"196\t" not in raw and b'"item"' not in raw and b"Star Wars" not in raw
    # a flipped byte in a device's store is detected, not read
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / DATABASE).write_bytes((folders[0] / DATABASE).read_bytes())
    db = sqlite3.connect(copy / DATABASE)
    (sealed,) = db.execute("SELECT sealed FROM rows WHERE kind = ? AND id = 3", (EVENT,)).fetchone()
    flipped = bytearray(sealed)
    flipped[-1] ^= 0x40
    db.execute("UPDATE rows SET sealed = ? WHERE kind = ? AND id = 3", (bytes(flipped), EVENT))
    db.commit()
    db.close()
    with (
        fedrec.device.open(copy, keys[0].read_bytes()) as device,
        pytest.raises(FedrecDataError, match="altered"),
    ):
        device.events()


def test_forget_leaves_only_the_ledger_and_recording_starts_afresh(deployed, tmp_path):
    _, folders, keys, _ = deployed
    folder = tmp_path / "device"
    folder.mkdir()
    for name in (DATABASE,):
        (folder / name).write_bytes((folders[1] / name).read_bytes())
    (folder / DATABASE).chmod(0o600)
    key = keys[1].read_bytes()
    with fedrec.device.open(folder, key) as device:
        before = device.export()
        assert len(before["events"]) == 737
        ledger = before["privacy"]["ledger"]
        device.forget()
        after = device.export()
        assert after["events"] == [] and after["personal_parameters"] is None
        assert after["privacy"]["ledger"] == ledger  # spent ε is not refunded
        assert "not refunded" in after["privacy"]["statement"]
        device.record("50", 900000000)
        assert device.export()["events"] == [{"item": "50", "t": 900000000, "kind": "view"}]
    # the forgotten events cannot be opened from the file, even with the key
    db = sqlite3.connect(folder / DATABASE)
    assert db.execute("SELECT count(*) FROM rows WHERE kind = ?", (EVENT,)).fetchone() == (1,)


def test_a_changed_global_model_is_not_kept(deployed, tmp_path):
    _, folders, keys, _ = deployed
    with fedrec.device.open(folders[2], keys[2].read_bytes()) as device:
        bundle = device.bundle()
        assert bundle is not None
        state = {k: v.clone() for k, v in bundle.state.items()}
        name = next(iter(state))
        state[name].view(-1)[0] += 1e-3
        with pytest.raises(ValueError, match="does not hash to the bundle"):
            device.accept_global(state, bundle.version, bundle.content_hash)
        assert device.store.get(BUNDLE) == bundle.to_bytes() or device.bundle() == bundle


def test_an_unknown_item_is_kept_and_reported(deployed):
    _, folders, keys, _ = deployed
    with fedrec.device.open(folders[0], keys[0].read_bytes()) as device:
        before = len(device.events())
        assert device.record("no-such-item", 999999999) is False
        assert device.unknown_items() == {"no-such-item": 1}
        assert len(device.events()) == before + 1
        assert len(device.recommend(5)) == 5  # still recommends from the known ones
        device.store.shred(kinds=(), names=())  # (keeps everything: re-sealed, same content)
        assert device.unknown_items() == {"no-such-item": 1}


def test_the_participation_policy_declines_before_training(deployed, tmp_path):
    _, folders, keys, _ = deployed
    with fedrec.device.open(folders[0], keys[0].read_bytes()) as device:
        device.policy = ParticipationPolicy(condition=lambda: False)
        assert "condition" in device.participation(3)
        device.policy = ParticipationPolicy(min_events=10_000)
        assert "fewer than the policy" in device.participation(3)
        device.policy = ParticipationPolicy(epsilon_budget=1e-3)
        assert "past the user's" in device.participation(3)
        device.policy = ParticipationPolicy(condition=lambda: False)
        bundle = device.bundle()
        assert bundle is not None
        events = len(device.ledger().events)
        reply = device.train_round(bundle.state, 3, bundle.content_hash)
        assert reply.metrics["refused"] == 1 and reply.metrics["num-examples"] == 0
        assert len(device.ledger().events) == events  # nothing released


def test_a_node_not_enrolled_or_claiming_another_client_is_excluded(caplog):
    class Grid:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            from flwr.app import Message, MetricRecord, RecordDict

            claims = {11: 0, 12: 0}  # node 12 is enrolled as client 1 but claims client 0
            return [
                Message(
                    RecordDict(
                        {"metrics": MetricRecord({"partition-id": claims[m.metadata.dst_node_id]})}
                    ),
                    reply_to=m,
                )
                for m in messages
            ]

    nodes = IdentifiedGrid(Grid(), 10, 3, enrolment={11: 0, 12: 1})
    assert nodes.get_node_ids() == [11]
    assert nodes.excluded == {12, 13}
    assert "not enrolled" in caplog.text and "enrolled as client 1" in caplog.text


def test_a_store_enrolled_as_one_client_refuses_another(deployed):
    _, folders, keys, _ = deployed
    with fedrec.device.open(folders[0], keys[0].read_bytes()) as device:
        config = yaml.safe_dump(device.config().to_dict(), sort_keys=True)
        catalogue = device.store.get("catalogue")
        assert catalogue is not None
        with pytest.raises(PermissionError, match="enrolled as client 0"):
            device.accept_enrolment(2, config, catalogue.decode())


def test_history_import_is_the_users_events_in_time_order():
    dataset = load_dataset(parse_config(CONFIG, "test").data)
    history = dataset_history(dataset, "405")
    assert len(history) == 737
    assert np.all(np.diff([t for _, t, *_ in history]) >= 0)
    # with the user's ratings (the ranker's like labels) and attributes
    rows = np.flatnonzero(dataset.raw_user_ids[dataset.user_ids] == "405")
    assert sorted(r for *_, r in history) == sorted(dataset.ratings[rows].tolist())
    assert dataset_attributes(dataset, "405") == {
        "age": "22",
        "gender": "F",
        "occupation": "healthcare",
        "zip_code": "10019",
    }


def test_a_bundle_round_trips_and_a_changed_byte_is_refused(deployed, tmp_path):
    run_dir = deployed[0]
    data = (run_dir / BUNDLE_DIR / "latest.bundle").read_bytes()
    bundle = ModelBundle.from_bytes(data, "latest.bundle")
    assert bundle.to_bytes() == data and bundle.version == 2
    assert (
        bundle_hash(bundle.version, bundle.config, bundle.catalogue_hash, bundle.state)
        == (json.loads((run_dir / BUNDLE_DIR / MANIFEST_FILE).read_text())["content_hash"])
    )
    changed = bytearray(data)
    changed[-5] ^= 1  # a tensor byte
    with pytest.raises(FedrecDataError, match="does not match its hash"):
        ModelBundle.from_bytes(bytes(changed), "changed.bundle")
    with pytest.raises(FedrecDataError, match="not a readable model bundle"):
        ModelBundle.from_bytes(data[:100], "truncated.bundle")


LLM = {
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 30, "num_items": 30, "mean_length": 14, "seed": 0},
    },
    **TINY_LLM,
    "federated": {
        "num_rounds": 1,
        "clients_per_round": 2,
        "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    },
}


def test_llm_devices_keep_their_personal_prompt_sealed_and_need_the_servers_foundation(tmp_path):
    config = parse_config(dict(LLM, output_dir=str(tmp_path / "run")), "test")
    population = population_of(config)
    users = [str(u) for u in population.dataset.raw_user_ids[:2].tolist()]
    foundation = tmp_path / "run" / "foundation"  # the server builds it; a device holds a copy
    configs = {}
    for client, user in enumerate(users):
        key = _key(tmp_path / f"{client}.key")
        with fedrec.device.open(tmp_path / f"device-{client}", key.read_bytes()) as device:
            device.record_many(dataset_history(population.dataset, user))
        configs[client] = {
            "store": str(tmp_path / f"device-{client}"),
            "key-file": str(key),
            "foundation": str(foundation),
        }
    from clients.app import app

    grid = InProcessGrid(len(population.partitions), app, {}, node_configs=configs)
    results = run_federation(
        population,
        tmp_path / "run",
        FirstNodes(grid, 2),
        write_stores=False,
        enrolment={1: 0, 2: 1},
    )
    assert results["rounds"] == 1 and not results["failed"]
    key = (tmp_path / "0.key").read_bytes()
    with fedrec.device.open(tmp_path / "device-0", key, foundation=foundation) as device:
        assert "personal" in device.store.names()  # the personal prompt, sealed in the store
        prompt = device.export()["personal_parameters"]
        assert prompt is not None and prompt["personal"]["shape"][0] == 2
        top = device.recommend(5)
        assert len(top) == 5 and not {r.item for r in top} & set(device.events().items.tolist())
        bundle = device.bundle()
        assert bundle is not None and bundle.foundation_hash
    assert not list((tmp_path / "device-0").glob("*.safetensors"))
    # another foundation (one byte changed) is refused, for training and for recommending
    other = tmp_path / "other-foundation"
    shutil.copytree(foundation, other)
    meta = other / "foundation.json"
    meta.write_text(meta.read_text() + " ")
    with fedrec.device.open(tmp_path / "device-0", key, foundation=other) as device:
        with pytest.raises(ValueError, match="does not hash to the bundle"):
            device.accept_global(bundle.state, bundle.version, bundle.content_hash)
        with pytest.raises(FedrecDataError, match="made with foundation"):
            device.recommend(5)
    with (
        fedrec.device.open(tmp_path / "device-0", key) as device,
        pytest.raises(FedrecDataError, match="needs its foundation on the device"),
    ):
        device.recommend(5)


def test_a_devices_files_never_share_a_path_with_the_servers_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    inside = {"store": str(run_dir / "devices" / "me"), "key-file": str(_key(tmp_path / "k"))}
    with pytest.raises(ValueError, match="inside the server's run folder"):
        open_device(inside, str(run_dir))
    plain = {"partition-id": 0, "store": str(tmp_path / "me" / "store")}
    with pytest.raises(ValueError, match=r"\['catalogue', 'ledger-dir'\] missing"):
        client_paths(run_dir, plain)
    plain.update(catalogue=str(tmp_path / "me" / "catalogue.json"), **{"ledger-dir": str(run_dir)})
    with pytest.raises(ValueError, match=r"ledger-dir .* is inside the server's run folder"):
        client_paths(run_dir, plain)


def _copy_store(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    (target / DATABASE).write_bytes((source / DATABASE).read_bytes())
    (target / DATABASE).chmod(0o600)
    return target


def test_a_device_declines_a_federation_without_record_dp_unless_allowed(deployed, tmp_path):
    _, folders, keys, _ = deployed
    folder = _copy_store(folders[1], tmp_path / "device")
    key = keys[1].read_bytes()
    with fedrec.device.open(folder, key) as device:
        config = device.config().to_dict()
        config["federated"]["record_dp"] = None
        config["federated"]["record_epsilon_budget"] = None
        text = yaml.safe_dump(config, sort_keys=True)
        catalogue = (device.store.get("catalogue") or b"").decode()
        device.accept_enrolment(1, text, catalogue)
        with pytest.raises(ValueError, match="names no client"):
            device.accept_enrolment(-1, text, catalogue)
        assert "no record-level DP" in device.participation(3)
        bundle = device.bundle()
        assert bundle is not None
        state, version = bundle.state, bundle.version
        before = device.privacy_statement()
        foundation = device._foundation_hash(device.config())
        announced = bundle_hash(version, text, bundle.catalogue_hash, state, foundation)
        assert device.train_round(state, version + 1, announced).metrics["refused"] == 1
        device.policy = ParticipationPolicy(allow_without_dp=True)
        assert device.train_round(state, version + 1, announced).metrics["refused"] == 0
        statement = device.privacy_statement()
        assert "without record-level DP in 1 round(s) (round 3)" in statement
        assert "without record-level DP" not in before
        assert device.export()["privacy"]["rounds_without_record_dp"] == [3]


def test_a_node_whose_identify_failed_is_asked_again():
    from flwr.app import Error, Message, MetricRecord, RecordDict

    calls: list[int] = []

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [5]

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 1:  # e.g. the app held the store
                return [Message(Error(0, "store busy"), reply_to=m) for m in messages]
            metrics = MetricRecord({"partition-id": 0})
            return [Message(RecordDict({"metrics": metrics}), reply_to=m) for m in messages]

    nodes = IdentifiedGrid(Grid(), 10, 2, enrolment={5: 0})
    assert nodes.get_node_ids() == [] and not nodes.excluded
    assert nodes.get_node_ids() == [5]
