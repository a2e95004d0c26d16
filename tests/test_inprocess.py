"""The in-process loop and the Flower simulation are one federation: the same round loop,
strategies and ClientApp, so the same config gives the same run in both engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedrec.config import parse_config
from fedrec.population import population_of
from simulations.inprocess import run_inprocess

from .processes import flower_processes, python

ROUNDS = 4
CONFIG = {
    "seed": 1,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 40, "num_items": 60, "mean_length": 20, "seed": 0},
    },
    "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
    "evaluation": {"ks": [10]},
    "audit": {
        "mode": "federated",
        "metrics": ["NDCG@10"],
        "exposure_noise": 8.0,
        "min_group_size": 1,
    },
    "federated": {
        "partitioning": "hash",
        "num_partitions": 6,
        "num_rounds": ROUNDS,
        "clients_per_round": 3,  # Poisson, q = 1/2: partial participation
        "local_epochs": 1,
        "local_learning_rate": 0.01,
        "reproducible_noise": True,  # both runs must draw the same noise and cohorts
        "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 4},
        "record_epsilon_budget": 7.0,  # some clients refuse before the last round
        "central_dp": {"noise_multiplier": 0.5, "clipping_norm": 0.5},
    },
}


def _lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        line.pop("seconds", None)  # wall time: the one thing that differs
    return lines


def _events(run_dir: Path) -> list[tuple]:
    ledger = torch.load(run_dir / "checkpoint.pt", weights_only=False)["ledger"]
    return sorted(tuple(sorted(e.items())) for e in ledger["events"])


def _assert_close(a, b, where: str = "", rel: float = 1e-9) -> None:
    """Equal up to float summation order (replies arrive in any order under Flower)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]", rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9, nan_ok=True), where
    else:
        assert a == b, where


def _schema(value):
    if isinstance(value, dict):
        return {k: _schema(v) for k, v in value.items()}
    return type(value).__name__


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("users_per_node", [1, 3])
def test_inprocess_loop_and_flower_simulation_give_the_same_federation(tmp_path, users_per_node):
    """Flower's simulation, with one node per client or cohort nodes of 3 clients, against the
    in-process loop with one node per client."""
    config_path = tmp_path / "tiny.yaml"
    flower_config = {**CONFIG, "output_dir": str(tmp_path / "flower")}
    flower_config["federated"] = {**CONFIG["federated"], "users_per_node": users_per_node}
    config_path.write_text(yaml.safe_dump(flower_config), encoding="utf-8")
    with flower_processes(tmp_path / "home") as (_, start):
        proc = start([python(), "-m", "fedrec.cli", "simulate", "-c", str(config_path)], "log")
        assert proc.wait(timeout=600) == 0, (tmp_path / "home" / "log").read_text()[-3000:]
    flower, inprocess = tmp_path / "flower", tmp_path / "inprocess"
    single = parse_config({**CONFIG, "output_dir": str(inprocess)}, "tiny.yaml")
    run_inprocess(population_of(single), inprocess, progress=False)

    metrics = _lines(flower / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    # The scenario happened: partial participation, budget refusals, both DP levels, the audit.
    assert any(0 < m["clients"] < 6 for m in metrics)
    # clients past their budget: refused by themselves, or not asked by the server's ledger
    assert sum(m["refused"] + m["withheld"] for m in metrics) > 0
    assert {"federation", "client_max"} <= metrics[-1]["epsilon"].keys()
    _assert_close(metrics, _lines(inprocess / "metrics.jsonl"), "metrics")
    audits = _lines(flower / "audit.jsonl")
    assert [a["round"] for a in audits] == list(range(1, ROUNDS + 1))
    _assert_close(audits, _lines(inprocess / "audit.jsonl"), "audit")

    # The same global model, ledger (every release of every client and of the server) and ε.
    models = [torch.load(run / "model.pt", weights_only=True) for run in (flower, inprocess)]
    assert models[0].keys() == models[1].keys()
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], atol=1e-6, rtol=0)
    assert _events(flower) == _events(inprocess)
    mechanisms = {dict(e)["mechanism"] for e in _events(flower)}
    assert mechanisms == {"dp-sgd", "dp-fedavg", "gaussian"}
    reports = [json.loads((run / "privacy.json").read_text()) for run in (flower, inprocess)]
    for part in ("federation", "clients", "units", "parties"):
        _assert_close(reports[0][part], reports[1][part], part)

    # One results.json schema; only the engine and the wall time differ.
    results = [json.loads((run / "results.json").read_text()) for run in (flower, inprocess)]
    assert _schema(results[0]) == _schema(results[1])
    assert (results[0]["engine"], results[1]["engine"]) == ("flower", "in-process")
    for result in results:
        for line in (result["final"], result["best_valid"]):
            line.pop("seconds")
    for key in ("rounds", "clients", "clients_per_round", "stopped_early", "failed", "final"):
        _assert_close(results[0][key], results[1][key], key)
