"""The funnel's ranker as a federated model of the Flower apps: each client builds its examples
from its own store only (events, ratings, attributes), the federation trains the ranker over a
frozen retrieval bundle, and every round publishes a serving bundle with the round's ranker."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedrec.device
from fedrec.config import parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.store import EventStore, RawEvents, client_split, partition_events
from fedrec.data.synthetic import AGE_BANDS, GENDERS
from fedrec.errors import FedrecConfigError, FedrecDataError
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.federated_models import build_federated_model
from fedrec.federation.config import CentralDPConfig, FederatedConfig
from fedrec.population import Population, population_of
from fedrec.serving.bundle import foundation_digest
from fedrec.serving.federated import RankingFederatedModel
from fedrec.serving.funnel import Funnel, FunnelConfig
from fedrec.serving.ranker import ranker_examples, ranker_scorer, sequential_user_vectors
from fedrec.serving.service import Recommender, newest_bundle
from fedrec.serving.store import SERVING_DIR, ServingConfig, load_serving_bundle
from simulations.inprocess import run_inprocess

from .conftest import FirstNodes
from .tiny import TINY_HSTU_FEDERATION

BASE = {
    **TINY_HSTU_FEDERATION,
    "federated": {**TINY_HSTU_FEDERATION["federated"], "num_rounds": 1},
    "serving": {"keep": 3, "funnel": {"sources": ["hstu", "popularity"], "retrieve_n": 20}},
}
SERVED = {"sources": ["hstu", "popularity"], "retrieve_n": 20, "rank": True}


def ranking_config(tmp_path, retrieval, **ranking):
    return parse_config(
        {
            **BASE,
            "output_dir": str(tmp_path / "ranker"),
            "federated": {
                **BASE["federated"],
                "num_rounds": 2,
                "local_optimizer": "sgd",
                "local_learning_rate": 0.1,
            },
            "ranking": {
                "retrieval": str(retrieval),
                "positions": 3,
                "retrieve_n": 20,
                "attributes": {"gender": list(GENDERS), "age": list(AGE_BANDS)},
                **ranking,
            },
            "serving": {"keep": 3, "funnel": SERVED},
        },
        "ranker.yaml",
    )


def rated(population: Population) -> Population:
    """The synthetic population with a rating for each event (the generator gives none)."""
    ratings = np.random.default_rng(0).integers(1, 6, size=len(population.split.items))
    split = dataclasses.replace(population.split, ratings=ratings.astype(np.float64))
    return dataclasses.replace(population, split=split)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """A federation of HSTU's serving bundle (round 1: HSTU ∪ popularity, no ranker)."""
    run = tmp_path_factory.mktemp("retrieval")
    config = parse_config({**BASE, "output_dir": str(run)}, "retrieval.yaml")
    run_inprocess(population_of(config), run, progress=False)
    return newest_bundle(run / SERVING_DIR)


def test_a_ranker_federation_trains_on_devices_and_publishes_ranked_bundles(tmp_path, retrieval):
    config = ranking_config(tmp_path, retrieval)
    assert config.federated_model_kind == "ranking"
    population = rated(population_of(config))
    run = tmp_path / "ranker"
    results = run_inprocess(population, run, progress=False)
    assert results["rounds"] == 2 and not results["failed"]
    frozen = load_serving_bundle(retrieval)
    root = run / SERVING_DIR
    assert sorted(p.name for p in root.iterdir()) == ["v000000", "v000001", "v000002"]
    first, last = (load_serving_bundle(root / v) for v in ("v000000", "v000002"))
    for bundle in (first, last):
        assert bundle.ranker is not None and bundle.funnel.rank
        assert bundle.ranker.config.tasks == ("like", "engage")
        for name, tensor in frozen.sequential.state_dict().items():  # retrieval stays frozen
            assert torch.equal(bundle.sequential.state_dict()[name], tensor)
    # The published ranker is the federation's final global one, and training moved it.
    exported = load_file(run / "ranker.safetensors")
    for name, tensor in last.ranker.state_dict().items():
        assert torch.equal(tensor, exported[name])
    assert any(
        not torch.equal(tensor, first.ranker.state_dict()[name])
        for name, tensor in last.ranker.state_dict().items()
    )
    # The service runs it: the ranker orders the candidates.
    recommender = Recommender(last, torch.device("cpu"))
    result = recommender.recommend([(np.arange(1, 6), np.arange(5) * 100)], [{"gender": "F"}])
    assert set(result.stages[0, :10]) == {"ranker"}
    final = json.loads((run / "results.json").read_text())["final"]
    assert 0 <= final["test"]["NDCG@10"] <= 1


def test_a_clients_examples_are_its_rows_of_the_populations(tmp_path, retrieval):
    """Oracle: what a device builds from its own store equals the population's examples of its
    users (the same candidates, features and labels), so federated and central rankers learn
    from the same pairs."""
    config = ranking_config(tmp_path, retrieval)
    population = rated(population_of(config))
    catalogue = ItemCatalogue.from_dataset(population.dataset)
    model = build_federated_model(config, catalogue, tmp_path)
    assert isinstance(model, RankingFederatedModel)
    drops = range(3, 6)
    user_vectors = sequential_user_vectors(model.encoder)

    def examples(split):
        return ranker_examples(
            model.retriever_funnel,
            model.tables,
            user_vectors,
            split,
            model.attributes(split),
            drops,
            config.ranking.tasks,
        )

    assert (model.attributes(population.split)[:, :2] > 0).all()  # age and gender known
    everyone = examples(population.split)
    assert everyone is not None
    batch, labels, owner = everyone
    assert labels[:, 1].sum() > 0 and labels[:, 0].sum() <= labels[:, 1].sum()  # like ⊆ engage
    for partition in range(len(population.partitions)):
        folder = tmp_path / f"store-{partition}"
        population.write_store(folder, partition)
        store = EventStore(folder)
        own = client_split(store.events(), catalogue, store.user_attributes()).split
        theirs = population.split.subset(population.partitions[partition])
        assert np.array_equal(own.ratings, theirs.ratings)
        assert np.array_equal(model.attributes(own), model.attributes(theirs))
        mine = examples(own)
        assert mine is not None
        for user_index, user in enumerate(population.partitions[partition]):
            expected = np.flatnonzero(owner == user)
            got = np.flatnonzero(mine[2] == user_index)
            assert len(expected) == len(got) > 0
            assert torch.equal(mine[1][got], labels[expected])
            for field_mine, field_all in zip(mine[0], batch, strict=True):
                assert torch.allclose(field_mine[got], field_all[expected], atol=1e-6)


def test_the_federated_models_scorer_ranks_as_the_funnel(tmp_path, retrieval):
    """Full-ranking metrics of the ranking model's scorer equal those of the funnel's own list
    (an item outside the candidates is a miss)."""
    config = ranking_config(tmp_path, retrieval)
    population = rated(population_of(config))
    model = build_federated_model(config, ItemCatalogue.from_dataset(population.dataset), tmp_path)
    assert isinstance(model, RankingFederatedModel)
    split = population.split
    metrics = evaluate(
        model.scorer(split, torch.device("cpu")), split, "test", EvalConfig(ks=(10,))
    )
    funnel = Funnel(
        model.funnel_config,
        model.sources,
        ranker_scorer(model.ranker, model.tables, sequential_user_vectors(model.encoder)),
        config.ranking.tasks,
    )
    users = np.arange(split.num_users)
    result = funnel(split.visible("test"), users, model.attributes(split))
    hit = result.items == split.targets("test")[:, None]
    position = np.where(hit.any(axis=1), hit.argmax(axis=1), 10**6)
    ndcg = np.where(position < 10, 1 / np.log2(position + 2), 0.0).mean()
    assert metrics.metrics["NDCG@10"] == pytest.approx(ndcg)


def test_local_training_lowers_the_clients_own_loss(tmp_path, retrieval):
    config = ranking_config(tmp_path, retrieval)
    population = rated(population_of(config))
    model = build_federated_model(config, ItemCatalogue.from_dataset(population.dataset), tmp_path)
    own = population.split.subset(population.partitions[0])
    fed = FederatedConfig(local_epochs=1, local_learning_rate=0.1, local_optimizer="sgd")
    first = model.train_local(own, fed, seed=0, personal=None).loss
    for _ in range(5):
        model.train_local(own, fed, seed=0, personal=None)
    result = model.train_local(own, fed, seed=0, personal=None)
    assert result.num_examples > 0 and result.loss < first
    short = own.subset(np.array([0])).without_last(len(own.full(0)[0]) - 3)  # 3 events: none
    assert model.train_local(short, fed, seed=0, personal=None).num_examples == 0


def test_ratings_round_trip_through_a_clients_store(tmp_path):
    events = RawEvents(
        users=np.array(["a", "a", "b"]),
        items=np.array(["1", "2", "1"]),
        timestamps=np.array([1, 2, 3]),
        ratings=np.array([4.0, np.nan, 2.5]),
    )
    back = EventStore.write(tmp_path / "s", events, {"a": {"gender": "F"}}).events()
    assert back.ratings is not None
    assert back.ratings[0] == 4.0 and np.isnan(back.ratings[1]) and back.ratings[2] == 2.5
    unrated = RawEvents(events.users, events.items, events.timestamps)
    assert EventStore.write(tmp_path / "u", unrated, {}).events().ratings is None
    (tmp_path / "s" / "events.json").write_text(
        json.dumps(
            {
                "format": "fedrec-events/1",
                "users": ["a"],
                "items": ["1"],
                "timestamps": [1],
                "ratings": ["five"],
            }
        )
    )
    with pytest.raises(Exception, match="ratings must be a list of numbers"):
        EventStore(tmp_path / "s").events()


def test_partition_events_carry_the_population_ratings(tmp_path):
    config = parse_config({**BASE, "output_dir": str(tmp_path)}, "x.yaml")
    population = rated(population_of(config))
    users = population.partitions[1]
    events = partition_events(population.dataset, population.split, users)
    assert np.array_equal(events.ratings, population.split.subset(users).ratings)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"federated": {**BASE["federated"], "record_dp": {"noise_multiplier": 1.0}}}, "record_dp"),
        ({"ranking": {"retrieval": "x", "attributes": {"gendre": ["F"]}}}, "did you mean 'gender'"),
        ({"ranking": {"retrieval": ""}}, "ranking.retrieval"),
        ({"ranking": {"retrieval": "x", "tasks": ["click"]}}, "ranking.tasks"),
        ({"ranking": {"retrieval": "x", "positions": 0}}, "ranking.positions"),
        ({"llm": {}}, "one model"),
    ],
)
def test_bad_ranking_settings_fail_at_load(change, message):
    data = {**BASE, "ranking": {"retrieval": "x"}, "serving": {"funnel": SERVED}, **change}
    with pytest.raises(FedrecConfigError, match=message):
        parse_config(data, "ranker.yaml")


def test_a_missing_or_foreign_retrieval_bundle_is_named(tmp_path, retrieval):
    config = ranking_config(tmp_path, tmp_path / "nowhere")
    catalogue = ItemCatalogue.from_dataset(population_of(config).dataset)
    with pytest.raises(FileNotFoundError, match=r"ranking\.retrieval"):
        build_federated_model(config, catalogue, tmp_path)
    other = parse_config(
        {
            **BASE,
            "data": {
                "source": "synthetic",
                "synthetic": {"num_users": 30, "num_items": 60, "mean_length": 15, "seed": 0},
            },
        },
        "other.yaml",
    )
    foreign = ItemCatalogue.from_dataset(population_of(other).dataset)
    with pytest.raises(ValueError, match="lists other items"):
        build_federated_model(ranking_config(tmp_path, retrieval), foreign, tmp_path)


def test_devices_train_the_ranker_from_their_encrypted_stores(tmp_path, retrieval):
    """Three devices, each one user's events (with ratings) and attributes in its encrypted
    store and a copy of the retrieval bundle, train the ranker through the ClientApp; a device
    that did not opt into training without record-level DP sits the rounds out."""
    from clients.app import app
    from server.rounds import run_federation
    from simulations.inprocess import InProcessGrid

    config = ranking_config(tmp_path, retrieval)
    config = dataclasses.replace(
        config, federated=dataclasses.replace(config.federated, partitioning="user")
    )
    population = rated(population_of(config))
    split, dataset = population.split, population.dataset
    copy = tmp_path / "device-retrieval"
    shutil.copytree(retrieval, copy)
    configs = {}
    for client in range(4):
        key = tmp_path / f"key-{client}"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        folder = tmp_path / f"device-{client}"
        user = int(population.partitions[client][0])
        items, times = split.full(user)
        lo = split.offsets[user]
        ratings = split.ratings[lo : lo + len(items)]
        with fedrec.device.open(folder, key.read_bytes()) as device:
            device.record_many(
                [
                    (str(dataset.raw_item_ids[i]), int(t), "view", float(r))
                    for i, t, r in zip(items, times, ratings, strict=True)
                ]
            )
            device.set_attributes({a: str(v[user]) for a, v in split.user_features.items()})
        configs[client] = {
            "store": str(folder),
            "key-file": str(key),
            "foundation": str(copy),
            "allow-without-dp": client < 3,  # the fourth keeps the default policy
        }
    grid = InProcessGrid(len(population.partitions), app, {}, node_configs=configs)
    enrolment = {client + 1: client for client in range(4)}
    results = run_federation(
        population, tmp_path / "run", FirstNodes(grid, 4), write_stores=False, enrolment=enrolment
    )
    assert results["rounds"] == 2 and not results["failed"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["clients"] for m in metrics if m["round"] > 0] == [4, 4]
    for client in range(4):
        key = (tmp_path / f"key-{client}").read_bytes()
        with fedrec.device.open(tmp_path / f"device-{client}", key) as device:
            bundle = device.bundle()
            assert bundle is not None and bundle.foundation_hash == foundation_digest(copy)
            statement = device.privacy_statement()
            if client < 3:
                assert "without record-level DP in 2 round(s)" in statement
            else:
                assert "has not released anything" in statement
            assert device.export()["attributes"]["gender"] in GENDERS
            with pytest.raises(FedrecDataError, match="fedrec serve"):
                device.recommend(5)


def test_a_device_keeps_ratings_and_attributes_sealed_and_forgets_them(tmp_path):
    key = os.urandom(32)
    with fedrec.device.open(tmp_path / "d", key) as device:
        device.record("i1", 10)
        device.record("i2", 20, "rating", rating=4)
        with pytest.raises(TypeError, match="rating must be a finite number"):
            device.record("i3", 30, "rating", rating=float("nan"))
        device.set_attributes({"gender": "F", "occupation": "writer"})
        ratings = device.events().ratings
        assert ratings is not None and np.isnan(ratings[0]) and ratings[1] == 4.0
        assert len(device.events()) == 2  # the refused event was not kept
    raw = b"".join(p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file())
    assert b"writer" not in raw and b'"rating"' not in raw
    with fedrec.device.open(tmp_path / "d", key) as device:
        assert device.export()["attributes"] == {"gender": "F", "occupation": "writer"}
        device.forget()
        assert device.attributes() == {} and len(device.events()) == 0


def test_user_level_dp_wraps_the_ranker_federation_and_its_bundles_state_epsilon(
    tmp_path, retrieval
):
    config = ranking_config(tmp_path, retrieval)
    fed = dataclasses.replace(
        config.federated,
        central_dp=CentralDPConfig(noise_multiplier=1.0, clipping_norm=0.5, sampling="fixed"),
    )
    population = rated(population_of(dataclasses.replace(config, federated=fed)))
    run = tmp_path / "ranker"
    results = run_inprocess(population, run, progress=False)
    assert results["rounds"] == 2 and not results["failed"]
    bundle = load_serving_bundle(newest_bundle(run / SERVING_DIR))
    epsilon, _, scope = bundle.epsilon
    assert bundle.ranker is not None and 0 < epsilon < math.inf
    assert scope.startswith("user-level")
    spent = json.loads((run / "results.json").read_text())["final"]["epsilon"]["federation"]
    assert epsilon == pytest.approx(spent)


def test_settings_that_cannot_run_are_named_before_any_round(tmp_path, retrieval):
    config = ranking_config(tmp_path, retrieval)  # like: the synthetic data has no ratings
    with pytest.raises(ValueError, match=r"'like' needs ratings.*tasks: \[engage\]"):
        run_inprocess(population_of(config), tmp_path / "unrated", progress=False)
    reordered = dataclasses.replace(
        config,
        ranking=dataclasses.replace(config.ranking, tasks=("engage",)),
        serving=ServingConfig(FunnelConfig(("popularity", "hstu"), retrieve_n=20, rank=True)),
    )
    with pytest.raises(ValueError, match="in their order"):
        run_inprocess(population_of(reordered), tmp_path / "reordered", progress=False)
