"""Slow end-to-end runs: the default experiment learns, on the real default config."""

from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.experiment import run_centralized

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["synthetic.yaml", "synthetic-sasrec.yaml"])
def test_sequential_models_clearly_beat_popularity_on_the_synthetic_default(tmp_path, config_name):
    config = load_config(REPO / "configs" / config_name)
    config.train.epochs = 20
    config.train.progress = False
    results = run_centralized(config, tmp_path)
    popularity = results["baselines"]["popularity"]["test"]
    assert results["test"]["NDCG@10"] > 2 * popularity["NDCG@10"]
    assert results["test"]["HR@10"] > 1.5 * popularity["HR@10"]
    assert (tmp_path / "best.pt").exists()
