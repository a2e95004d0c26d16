"""The Flower simulation end to end: both DP kinds, client budgets, a killed server, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant

from fedrec.config import load_config
from fedrec.data import prepare_split
from fedrec.data.partition import partition_users
from fedrec.privacy.dp_sgd import plan_dp
from fedrec.training import trainable_users

from .processes import flower_processes, python, wait_for

# Enough that the kill after round 2 lands mid-run even on a loaded machine (12 once did not).
ROUNDS = 30
RECORD_SIGMA, CENTRAL_SIGMA = 1.0, 0.5


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _tiny_config(
    path: Path, run_dir: Path, budget: float | None, reproducible: bool = False
) -> Path:
    config = {
        "seed": 0,
        "output_dir": str(run_dir),
        "data": {
            "source": "synthetic",
            "synthetic": {
                "num_users": 12,
                "num_items": 40,
                "mean_length": 15,
                "max_length": 30,
                "seed": 0,
            },
        },
        "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
        "evaluation": {"ks": [10]},
        "federated": {
            "partitioning": "hash",
            "num_partitions": 3,
            "num_rounds": ROUNDS,
            "clients_per_round": 3,
            "record_dp": {"noise_multiplier": RECORD_SIGMA, "max_grad_norm": 1.0},
            "record_epsilon_budget": budget,
            "central_dp": {"noise_multiplier": CENTRAL_SIGMA, "clipping_norm": 1.0},
            "reproducible_noise": reproducible,
        },
        "audit": {"min_group_size": 1},  # 5 users after preprocessing: compare every group
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _client_plans(config_path: Path) -> list[tuple[float, float, int, float]]:
    """(σ, q, steps, δ) each silo's record-level DP-SGD spends per round (one record = one user)."""
    config = load_config(config_path)
    dataset, split = prepare_split(config.data)
    partitions = partition_users(dataset, "hash", 3, "")
    assert config.federated.record_dp is not None
    plans = []
    for users in partitions:
        records = len(trainable_users(split.subset(users)))
        plan = plan_dp(records, config.federated.record_dp, config.federated.local_epochs)
        plans.append((plan.noise_multiplier, plan.sample_rate, plan.steps, plan.delta))
    return plans


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_with_both_dp_kinds_survives_a_kill_and_resumes_its_ledger(tmp_path):
    run_dir = tmp_path / "run"
    probe = _tiny_config(tmp_path / "probe.yaml", run_dir, None)
    plans = _client_plans(probe)
    # A budget that lets client 0 train exactly two rounds; the others get what it allows them.
    sigma, q, steps, delta = plans[0]
    budget = (
        _rdp_epsilon([(sigma, q, 2 * steps)], delta) + _rdp_epsilon([(sigma, q, 3 * steps)], delta)
    ) / 2
    expected_rounds = [
        max(k for k in range(ROUNDS + 1) if _rdp_epsilon([(s, r, k * n)], d) <= budget)
        for s, r, n, d in plans
    ]
    assert expected_rounds[0] == 2
    config = _tiny_config(tmp_path / "tiny.yaml", run_dir, budget)
    simulate = [python(), "-m", "fedrec.cli", "simulate", "-c", str(config)]

    with flower_processes(tmp_path) as (_, start):
        first = start(simulate, "first.log")
        checkpoint = run_dir / "checkpoint.pt"
        wait_for(
            lambda: (
                checkpoint.exists() and torch.load(checkpoint, weights_only=False)["round"] >= 2
            ),
            timeout=600,
            what="round 2's checkpoint",
            log=tmp_path / "first.log",
        )
        first.kill()  # the server dies mid-run (SIGKILL: no clean-up)
        first.wait(timeout=30)
    killed_at = torch.load(checkpoint, weights_only=False)["round"]
    assert 2 <= killed_at < ROUNDS

    with flower_processes(tmp_path) as (_, start):
        resumed = start([*simulate, "--resume"], "resumed.log")
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-4000:]

    log = (tmp_path / "resumed.log").read_text()
    assert f"resumed from {checkpoint} at round {killed_at}" in log
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    state = torch.load(checkpoint, weights_only=False)
    assert state["round"] == ROUNDS
    events = state["ledger"]["events"]

    # The federation's ledger never reset: one DP-FedAvg event per round, ε equal to a fresh
    # Opacus accountant fed the same (σ, q = 3/3, 1 step) releases.
    server = [e for e in events if e["party"] == "server"]
    assert [e["round"] for e in server] == list(range(1, ROUNDS + 1))
    assert all(e["unit"] == "user" and e["noise_multiplier"] == CENTRAL_SIGMA for e in server)
    expected_federation = _rdp_epsilon(
        [(CENTRAL_SIGMA, 1.0, 1)] * ROUNDS, 1e-5
    )  # min(1e-5, 3^-1.1)
    assert history[-1]["epsilon"]["federation"] == pytest.approx(expected_federation, rel=1e-9)
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["federation"]["epsilon"] == pytest.approx(expected_federation, rel=1e-9)
    assert report["units"].keys() == {"user", "user-within-silo"}
    assert (run_dir / "privacy.html").stat().st_size > 10_000

    # Every client trained exactly as many rounds as its budget allows, then refused.
    for partition, allowed in enumerate(expected_rounds):
        own = json.loads((run_dir / "devices" / f"client-{partition}.json").read_text())
        assert len(own["events"]) == allowed, partition
        s, r, n, d = plans[partition]
        assert _rdp_epsilon([(s, r, allowed * n)], d) <= budget
    # past its budget a client refuses, or (once the server's ledger shows it) is not asked
    refused = sum(h["refused"] + h["withheld"] for h in history)
    assert refused >= sum(ROUNDS - k for k in expected_rounds) - 3 * (ROUNDS - killed_at)
    assert refused > 0
    assert math.isfinite(history[-1]["test"]["NDCG@10"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds"] == ROUNDS and results["clients"] == 3
    # The server-side audit ran every round; the resume trimmed its log like metrics.jsonl.
    audits = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [a["round"] for a in audits] == list(range(1, ROUNDS + 1))
    assert {"gender", "age", "activity", "most-active"} <= audits[-1]["groups"].keys()
    assert (run_dir / "audit.html").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flwr_run_local_simulation_and_fedrec_simulate_are_one_code_path(tmp_path):
    """`flwr run .` (pyproject [tool.flwr.app], Flower's detached local SuperLink) and
    `fedrec simulate` give the same per-round metrics for the same config and seed (in the
    reproducible mode: by default the DP noise of two runs differs)."""
    histories = []
    for mode in ("simulate", "flwr-run"):
        run_dir = tmp_path / mode
        config = _tiny_config(tmp_path / f"{mode}.yaml", run_dir, None, reproducible=True)
        with flower_processes(tmp_path / mode) as (_, start):
            if mode == "simulate":
                proc = start([python(), "-m", "fedrec.cli", "simulate", "-c", str(config)], "log")
                assert proc.wait(timeout=300) == 0
            else:
                flwr = str(Path(python()).parent / "flwr")
                setup = start(
                    [flwr, "federation", "simulation-config", "--num-supernodes", "3"], "setup"
                )
                assert setup.wait(timeout=120) == 0
                run_config = f"config='{config}' run-dir='{run_dir}'"
                start([flwr, "run", ".", "--run-config", run_config, "--stream"], "log")
                wait_for(
                    lambda run_dir=run_dir: (run_dir / "results.json").exists(),
                    timeout=300,
                    what="results.json of `flwr run .`",
                    log=tmp_path / mode / "log",
                )
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        histories.append([(h["round"], h["valid"], h["epsilon"]) for h in map(json.loads, lines)])
    assert len(histories[0]) == ROUNDS
    assert histories[0] == histories[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federated_audit_adds_client_sums_ledgers_their_noise_and_stops_on_a_breach(tmp_path):
    run_dir = tmp_path / "run"
    config_path = _tiny_config(tmp_path / "tiny.yaml", run_dir, None)
    config = yaml.safe_load(config_path.read_text())
    config["federated"].update(num_rounds=4, record_dp=None, central_dp=None)
    # Coverage can never exceed 1: the first audit breaches and the run stops after round 1.
    config["audit"] = {
        "min_group_size": 1,
        "mode": "federated",
        "exposure_noise": 2.0,
        "min_coverage": 1.01,
        "stop_on_breach": True,
    }
    config_path.write_text(yaml.safe_dump(config))
    with flower_processes(tmp_path) as (_, start):
        proc = start([python(), "-m", "fedrec.cli", "simulate", "-c", str(config_path)], "log")
        assert proc.wait(timeout=500) == 0, (tmp_path / "log").read_text()[-4000:]
    log = (tmp_path / "log").read_text()
    assert "audit threshold breached in round 1" in log and "min_coverage 1.01" in log
    audits = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [a["round"] for a in audits] == [1] and audits[0]["mode"] == "federated"
    counts = audits[0]["groups"]["gender"]["HR@10"]["counts"]
    users = prepare_split(load_config(config_path).data)[1].num_users
    assert sum(counts.values()) == users  # every user of the 3 silos, summed from client replies
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped_early"].startswith("audit threshold breached")
    events = torch.load(run_dir / "checkpoint.pt", weights_only=False)["ledger"]["events"]
    noise = [e for e in events if e["mechanism"] == "gaussian"]
    # Without record-level DP each silo's histogram is protected per whole client (unit "user"),
    # at the sensitivity √(2K) of swapping one K-hot list for another; the silo's own ledger
    # holds the same events as the server's.
    assert len(noise) == 3 and all(e["unit"] == "user" for e in noise)
    assert noise[0]["noise_multiplier"] == pytest.approx(2.0 / math.sqrt(20))
    for partition in range(3):
        own = json.loads((run_dir / "devices" / f"client-{partition}.json").read_text())
        assert [e["mechanism"] for e in own["events"]] == ["gaussian"]
    assert (run_dir / "audit.html").exists()


def test_the_driver_loads_one_population_whatever_path_names_its_config(tmp_path, monkeypatch):
    """`fedrec simulate` loads it by the path given and its ServerApp by $FEDREC_CONFIG (made
    absolute): one population in the driver, not two."""
    from fedrec.population import load_population

    _tiny_config(tmp_path / "tiny.yaml", tmp_path / "run", None)
    monkeypatch.chdir(tmp_path)
    assert load_population("tiny.yaml") is load_population(str(tmp_path / "tiny.yaml"))
