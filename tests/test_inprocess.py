"""The in-process reference loop reproduces the Flower simulation (same clients, same seeds)."""

from __future__ import annotations

import json

import pytest
import yaml

from fedrec.config import load_config
from fedrec.population import population_of
from simulations.inprocess import run_inprocess

from .processes import flower_processes, python


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inprocess_loop_matches_the_flower_simulation_round_by_round(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "seed": 1,
                "output_dir": str(tmp_path / "flower"),
                "data": {
                    "source": "synthetic",
                    "synthetic": {"num_users": 12, "num_items": 40, "mean_length": 15, "seed": 0},
                },
                "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
                "evaluation": {"ks": [10]},
                "federated": {
                    "partitioning": "hash",
                    "num_partitions": 3,
                    "num_rounds": 3,
                    "clients_per_round": 3,  # everyone: Flower's sampling order plays no part
                    "local_epochs": 2,
                    "local_learning_rate": 0.01,
                    "reproducible_noise": True,  # both runs must draw the same noise
                    "record_dp": {"noise_multiplier": 0.7, "max_grad_norm": 1.0},
                    "central_dp": {"noise_multiplier": 0.3, "clipping_norm": 0.5},
                },
            }
        ),
        encoding="utf-8",
    )
    with flower_processes(tmp_path / "home") as (_, start):
        proc = start([python(), "-m", "fedrec.cli", "simulate", "-c", str(config_path)], "log")
        assert proc.wait(timeout=300) == 0
    flower = [json.loads(line) for line in (tmp_path / "flower" / "metrics.jsonl").open()]
    run_inprocess(population_of(load_config(config_path)), tmp_path / "inprocess", progress=False)
    inprocess = [json.loads(line) for line in (tmp_path / "inprocess" / "metrics.jsonl").open()]
    assert len(flower) == len(inprocess) == 3
    for a, b in zip(flower, inprocess, strict=True):
        assert a["round"] == b["round"]
        for split in ("valid", "test"):
            assert a[split] == pytest.approx(b[split], abs=1e-6), (a["round"], split)
    flower_report = json.loads((tmp_path / "flower" / "privacy.json").read_text())
    inprocess_report = json.loads((tmp_path / "inprocess" / "privacy.json").read_text())
    assert flower_report["clients"] == inprocess_report["clients"]
