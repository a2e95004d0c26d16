"""Every release a client makes is accounted in its own ledger and budget, or not made."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from clients.app import evaluate_on_device, train
from fedrec.config import load_config
from fedrec.federated_models import build_federated_model
from fedrec.federation import exposure_event
from fedrec.federation.layout import simulated_store
from fedrec.population import load_population
from fedrec.privacy import PrivacyLedger
from simulations.inprocess import InProcessGrid


def _config(tmp_path: Path, budget: float, exposure_noise: float = 4.0) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "output_dir": str(tmp_path / "run"),
                "data": {
                    "source": "synthetic",
                    "synthetic": {"num_users": 8, "num_items": 30, "mean_length": 40, "seed": 0},
                },
                "model": {"name": "hstu", "max_len": 16, "embedding_dim": 8, "num_blocks": 1},
                "evaluation": {"ks": [10]},
                "federated": {
                    "num_rounds": 5,
                    "clients_per_round": 2,
                    "record_window": 5,
                    "record_period": 7 * 86400,
                    "record_dp": {"noise_multiplier": 1.5, "batch_size": 4},
                    "record_epsilon_budget": budget,
                },
                "audit": {
                    "mode": "federated",
                    "metrics": ["NDCG@10"],
                    "exposure_noise": exposure_noise,
                    "min_group_size": 1,
                },
            }
        ),
        encoding="utf-8",
    )
    return path


def _call(handler, config: Path, device: Path, round_: int, kind: str) -> Message:
    InProcessGrid(1)  # the message identity a Flower process would have
    population = load_population(str(config))
    run_dir = device.parent / "run"
    catalogue = population.publish(run_dir)  # the server's start of a run
    population.write_store(simulated_store(run_dir, 0), 0)  # the device's own events
    model = build_federated_model(population.config, catalogue, run_dir)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.shared_state()),
            "config": ConfigRecord({"server-round": round_}),
        }
    )
    message = Message(content, dst_node_id=1, message_type=kind)
    context = Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": 0, "ledger-dir": str(device)},
        state=RecordDict(),
        run_config={"config": str(config), "run-dir": str(run_dir)},
    )
    return handler(message, context)


def _ledger(device: Path) -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.load_state_dict(json.loads((device / "client-0.json").read_text(encoding="utf-8")))
    return ledger


def test_a_dp_reply_carries_no_unaccounted_data_and_the_ledger_stays_on_the_device(tmp_path):
    config, device = _config(tmp_path, budget=50.0), tmp_path / "device"
    reply = _call(train, config, device, 1, MessageType.TRAIN)
    metrics = reply.content["metrics"]
    assert "train-loss" not in metrics  # off by default under DP
    assert metrics["num-examples"] == 1  # not the record count
    assert metrics["dp-delta"] == 1e-5 and metrics["dp-steps"] > 0
    assert (device / "client-0.json").stat().st_mode & 0o777 == 0o600
    event = _ledger(device).events[0]
    assert event.unit == "user-day" and event.delta == 1e-5 and event.accountant == "rdp"


def test_the_exposure_histogram_counts_against_the_client_budget(tmp_path):
    """Audit releases go into the client's own ledger; once the budget is spent the client
    withholds its histogram and refuses to train."""
    config = load_config(str(_config(tmp_path, budget=3.0, exposure_noise=20.0)))
    one = exposure_event(config.federated, config.audit, 0, 1)
    assert one.noise_multiplier == pytest.approx(20.0 / math.sqrt(20))  # σ / √(2K), K = 10
    device = tmp_path / "device"
    released = []
    for round_ in range(1, 12):
        reply = _call(evaluate_on_device, tmp_path / "tiny.yaml", device, round_, "evaluate")
        released.append(reply.content["metrics"]["audit-exposure-released"])
    ledger = _ledger(device)
    assert released[0] == 1 and released[-1] == 0  # the budget ran out
    assert len(ledger.events) == sum(released)
    assert all(e.mechanism == "gaussian" for e in ledger.events)
    assert ledger.epsilon("client:0", 1e-5) <= 3.0
    withheld = reply.content["metrics"]
    assert not any(withheld["audit/exposure"])  # nothing of the histogram was sent
    trained = _call(train, tmp_path / "tiny.yaml", device, 12, MessageType.TRAIN)
    assert trained.content["metrics"]["refused"] == 1
