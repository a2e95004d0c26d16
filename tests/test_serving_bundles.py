"""A federation writes a serving bundle after every round: the round's model and the ledger's
ε at that round, the newest few kept, each loadable by the service; and bad serving settings
fail at load with the option named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrec.config import parse_config
from fedrec.errors import FedrecConfigError
from fedrec.population import population_of
from fedrec.serving.service import Recommender, newest_bundle
from fedrec.serving.store import SERVING_DIR, load_serving_bundle
from simulations.inprocess import run_inprocess

from .tiny import TINY_HSTU_FEDERATION

CONFIG = {
    **TINY_HSTU_FEDERATION,
    "federated": {
        **TINY_HSTU_FEDERATION["federated"],
        "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 4},
    },
    "serving": {"keep": 2, "funnel": {"sources": ["hstu", "popularity"], "retrieve_n": 20}},
}


def test_a_federation_publishes_a_serving_bundle_each_round(tmp_path):
    config = parse_config({**CONFIG, "output_dir": str(tmp_path)}, "serving.yaml")
    run_inprocess(population_of(config), tmp_path, progress=False)
    root = tmp_path / SERVING_DIR
    assert sorted(p.name for p in root.iterdir()) == ["v000002", "v000003"]  # keep: 2
    bundle = load_serving_bundle(newest_bundle(root))
    assert bundle.version == 3 and not bundle.funnel.rank and bundle.ranker is None
    final = json.loads((tmp_path / "results.json").read_text())
    spent = final["final"]["epsilon"]
    epsilon, delta, scope = bundle.epsilon
    assert epsilon == pytest.approx(spent["client_max"]) and epsilon > 0
    assert delta == pytest.approx(spent["client_max_delta"]) and scope.startswith("record-level")
    earlier = load_serving_bundle(root / "v000002")
    assert earlier.epsilon[0] < epsilon  # ε at each round, never restated lower later
    # The served model is the federation's: the funnel's list is the model's own ranking.
    recommender = Recommender(bundle, torch.device("cpu"))
    items, times = np.arange(1, 6), np.arange(5) * 100
    result = recommender.recommend([(items, times)], [{}])
    with torch.no_grad():
        scores = bundle.sequential.score_all(
            torch.from_numpy(items + 1)[None], torch.from_numpy(times)[None]
        )[0]
    scores[items] = -torch.inf
    assert result.items[0, :10].tolist() == torch.topk(scores, 10).indices.tolist()
    assert set(result.stages[0, :10]) == {"hstu"}


@pytest.mark.parametrize(
    "serving, message",
    [
        ({"funnel": {"rank": True}}, "trains no ranker"),
        ({"funnel": {"sources": ["hstu", "semantic_id", "popularity"]}}, "serves"),
        ({"keep": 0}, "serving.keep"),
        ({"funnel": {"retrieve_n": 0}}, "retrieve_n"),
    ],
)
def test_bad_serving_settings_fail_at_load(serving, message):
    with pytest.raises(FedrecConfigError, match=message):
        parse_config({**CONFIG, "serving": serving}, "serving.yaml")
