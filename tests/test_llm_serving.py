"""An LLM recommender federation's serving bundles: each round's adapters travel as a hashed
part beside a frozen retrieval bundle, and ``fedrec serve --foundation`` runs them as the
funnel's ``llm`` source, equal to the LLM recommender's own list."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from fedrec.config import parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecConfigError, FedrecDataError
from fedrec.llm_rec.federated import new_llm_model
from fedrec.population import population_of
from fedrec.recommend import foundation_llm_source
from fedrec.serving.bundle import foundation_digest
from fedrec.serving.service import Recommender, newest_bundle
from fedrec.serving.store import SERVING_DIR, load_serving_bundle
from simulations.inprocess import run_inprocess

from .tiny import TINY_LLM

DATA = {
    "source": "synthetic",
    "synthetic": {"num_users": 30, "num_items": 30, "mean_length": 14, "seed": 0},
}
FEDERATED = {"num_rounds": 1, "clients_per_round": 3, "num_partitions": 3, "partitioning": "hash"}
FUNNEL = {"sources": ["llm", "hstu", "popularity"], "retrieve_n": 5}


def llm_config(tmp_path, retrieval, **serving):
    return parse_config(
        {
            "seed": 0,
            "data": DATA,
            **TINY_LLM,
            "federated": FEDERATED,
            "output_dir": str(tmp_path / "llm"),
            "serving": {"retrieval": str(retrieval), "funnel": FUNNEL, **serving},
        },
        "llm.yaml",
    )


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """(retrieval bundle, the LLM federation's run folder) after one round of each."""
    root = tmp_path_factory.mktemp("llm-serving")
    sequential = parse_config(
        {
            "seed": 0,
            "data": DATA,
            "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
            "audit": {"enabled": False},
            "federated": FEDERATED,
            "serving": {"funnel": {"sources": ["hstu", "popularity"], "retrieve_n": 5}},
        },
        "hstu.yaml",
    )
    run_inprocess(population_of(sequential), root / "hstu", progress=False)
    retrieval = newest_bundle(root / "hstu" / SERVING_DIR)
    config = llm_config(root, retrieval)
    results = run_inprocess(population_of(config), root / "llm", progress=False)
    assert results["rounds"] == 1 and not results["failed"]
    return retrieval, root / "llm"


def test_each_round_serves_the_llm_adapters_beside_the_frozen_retrieval(llm_run):
    retrieval, run = llm_run
    frozen = load_serving_bundle(retrieval)
    bundle = load_serving_bundle(newest_bundle(run / SERVING_DIR))
    assert bundle.version == 1 and bundle.llm is not None and bundle.ranker is None
    assert bundle.llm.foundation_hash == foundation_digest(run / "foundation")
    for name, tensor in frozen.sequential.state_dict().items():
        assert torch.equal(bundle.sequential.state_dict()[name], tensor)
    final = (run / "bundle" / "latest.bundle").read_bytes()
    assert bundle.llm.to_bytes() == final  # the round's own model bundle, adapters and all
    with pytest.raises(FedrecDataError, match="--foundation"):
        Recommender(bundle, torch.device("cpu"))


def test_the_llm_source_is_the_llm_recommenders_own_list(llm_run, tmp_path):
    _, run = llm_run
    bundle = load_serving_bundle(newest_bundle(run / SERVING_DIR))
    assert bundle.llm is not None
    recommender = Recommender(
        bundle, torch.device("cpu"), foundation_llm_source(run / "foundation")
    )
    items, times = np.array([1, 4, 7, 2]), np.arange(4) * 100
    result = recommender.recommend([(items, times)], [{}])
    # The reference: the round's adapters on the foundation, the shared personal prompt.
    config = parse_config(yaml.safe_load(bundle.llm.config), "round", bundle.llm.config)
    catalogue = ItemCatalogue.from_text(bundle.llm.catalogue, "round")
    wrapper = new_llm_model(config.llm, catalogue, config.seed, run / "foundation")
    wrapper.load_shared_state(bundle.llm.state)
    wrapper.model.load_personal_state(None)
    wrapper.model.eval()
    expected = [item for item, _ in wrapper.model.top_unseen(items, times, 5, catalogue.num_items)]
    assert len(expected) == 5
    assert result.items[0, :5].tolist() == expected  # llm is the first source
    assert set(result.stages[0, :5]) == {"llm"}
    # another foundation (one byte changed) is refused
    other = tmp_path / "foundation"
    shutil.copytree(run / "foundation", other)
    (other / "foundation.json").write_text((other / "foundation.json").read_text() + " ")
    with pytest.raises(FedrecDataError, match="not this one"):
        Recommender(bundle, torch.device("cpu"), foundation_llm_source(other))


def test_serving_settings_of_an_llm_federation_fail_at_load(tmp_path):
    with pytest.raises(FedrecConfigError, match=r"serving\.retrieval"):
        llm_config(tmp_path, "")
    with pytest.raises(FedrecConfigError, match="only an LLM federation"):
        parse_config({"data": DATA, "serving": {"retrieval": "x"}}, "hstu.yaml")
