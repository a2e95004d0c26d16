"""Benchmarks of the device SDK and the deployment (BENCHMARKS.md, "Devices and deployment").

    python simulations/bench_device.py recommend   # on-device recommend: p50 / p99 per call
    python simulations/bench_device.py store       # encrypted store write throughput
    python simulations/bench_device.py deployment  # a deployed round next to the simulated one

Every mode runs HSTU as ``configs/ml-100k-deploy.yaml`` sets it (50 dimensions, 2 blocks).
``recommend``: its global model of round 0 on a device holding the history of ML-100K's
heaviest user (737 ratings); each call builds the model input from the events, scores every
item and excludes the history (and, opened afresh, first decrypts every event). ``store``: events
recorded one per call (a transaction each, ``synchronous=FULL``) and in batches. ``deployment``:
three devices (tests/processes.py ``Deployment``: TLS, SuperNode auth, encrypted stores) for
three rounds, and the same three devices' stores through the same ClientApp in process; per
round the wall time (sampling to aggregation) and the bytes each device receives and sends
(the serialised arrays, without gRPC, HTTP or TLS framing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flwr.app import ArrayRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedrec.device
from fedrec.config import load_config, parse_config
from fedrec.data import load_dataset
from fedrec.data.catalogue import ItemCatalogue
from fedrec.device.client import dataset_history
from fedrec.federated_models import initial_federated_model
from fedrec.federation.layout import CATALOGUE_FILE
from fedrec.population import population_of
from fedrec.serving.bundle import bundle_hash

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ml-100k-deploy.yaml"
HEAVY_USER = "405"


def _device_with_model(folder: Path, user: str) -> tuple[fedrec.device.DeviceClient, bytes]:
    """A device holding ``user``'s history, enrolled, with the config's round-0 model; and
    its store's key."""
    config = load_config(CONFIG)
    population = population_of(config)
    run_dir = folder / "server"
    catalogue = population.publish(run_dir)
    text = yaml.safe_dump(config.to_dict(), sort_keys=True)
    published = (run_dir / CATALOGUE_FILE).read_text(encoding="utf-8")
    state = initial_federated_model(config, catalogue, run_dir).shared_state()
    key = os.urandom(32)
    device = fedrec.device.open(folder / "device", key)
    device.accept_enrolment(0, text, published)
    device.accept_global(state, 0, bundle_hash(0, text, catalogue.content_hash, state))
    device.record_many(dataset_history(population.dataset, user))
    return device, key


def recommend(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        device, key = _device_with_model(Path(tmp), HEAVY_USER)
        started = time.perf_counter()
        device.recommend(10)  # builds the model from the bundle
        first = time.perf_counter() - started
        times = []
        for _ in range(args.calls):
            started = time.perf_counter()
            top = device.recommend(10)
            times.append(time.perf_counter() - started)
        assert len(top) == 10
        events = len(device.events())
        folder = device.store.folder
        device.close()
        cold = []  # an app's first call after opening the store: every event decrypted
        for _ in range(args.cold):
            started = time.perf_counter()
            with fedrec.device.open(folder, key) as reopened:
                reopened.recommend(10)
            cold.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {
        "user": HEAVY_USER,
        "events": events,
        "calls": args.calls,
        "first_call_ms": first * 1000,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "open_and_first_call_median_ms": statistics.median(cold) * 1000,
    }


def store(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset(load_config(CONFIG).data)
    history = dataset_history(dataset, HEAVY_USER)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        device = fedrec.device.open(Path(tmp) / "one", os.urandom(32))
        started = time.perf_counter()
        for event in history[: args.single]:
            device.record(*event)
        out["one_per_call_events_per_s"] = args.single / (time.perf_counter() - started)
        device.close()
        batches = []
        device = fedrec.device.open(Path(tmp) / "batch", os.urandom(32))
        for _ in range(args.batches):
            started = time.perf_counter()
            device.record_many(history)
            batches.append(len(history) / (time.perf_counter() - started))
        out["batch_events_per_s_median"] = statistics.median(batches)
        out["batch_size"] = len(history)
        started = time.perf_counter()
        read = len(device.store.rows("event"))
        out["read_events_per_s"] = read / (time.perf_counter() - started)
        device.close()
        out["bytes_per_event_on_disk"] = (Path(tmp) / "batch" / "store.db").stat().st_size / read
    return out


def _round_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines if json.loads(line)["round"] > 0]


def _payload_bytes(run_dir: Path) -> int:
    """The serialised arrays of one model (what one device receives, and sends back)."""
    config = parse_config(json.loads((run_dir / "results.json").read_text())["config"], "results")
    catalogue = ItemCatalogue.load(run_dir / CATALOGUE_FILE)
    state = initial_federated_model(config, catalogue, run_dir).shared_state()
    return sum(len(array.data) for array in ArrayRecord(state).values())


def deployment(args: argparse.Namespace) -> dict[str, Any]:
    from server.rounds import run_federation
    from simulations.inprocess import InProcessGrid
    from tests.processes import Deployment, flower_processes, wait_for

    root = Path(tempfile.mkdtemp(prefix="bench-device-"))
    with flower_processes(root / "deployed") as (_env, start):
        deployed = Deployment(root / "deployed", start, rounds=args.rounds, model={})
        started = time.perf_counter()
        deployed.set_up()
        submit = deployed.submit("run.log")
        wait_for(
            lambda: (deployed.run_dir / "results.json").exists(),
            timeout=1800,
            what="the deployed run",
            log=deployed.root / "run.log",
            watch=(submit, *deployed.nodes),
        )
        total = time.perf_counter() - started
    # The same devices' stores through the same ClientApp, in this process.
    from clients.app import app

    config_data = yaml.safe_load(deployed.config.read_text())
    config = parse_config(dict(config_data, output_dir=str(root / "inprocess")), "bench")
    population = population_of(config)
    nodes = {}
    for i, user in enumerate(Deployment.USERS):
        key = root / f"inprocess-{i}.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        with fedrec.device.open(root / f"inprocess-{i}", key.read_bytes()) as device:
            device.record_many(dataset_history(population.dataset, user))
        nodes[i] = {"store": str(root / f"inprocess-{i}"), "key-file": str(key)}
    grid = InProcessGrid(len(Deployment.USERS), app, {}, node_configs=nodes)
    run_federation(
        population,
        root / "inprocess",
        grid,
        write_stores=False,
        enrolment={i + 1: i for i in range(len(Deployment.USERS))},
    )
    payload = _payload_bytes(deployed.run_dir)
    deployed_rounds = _round_seconds(deployed.run_dir)
    inprocess_rounds = _round_seconds(root / "inprocess")
    return {
        "devices": len(Deployment.USERS),
        "rounds": args.rounds,
        "deployed_round_seconds": deployed_rounds,
        "deployed_round_median_s": statistics.median(deployed_rounds),
        "inprocess_round_seconds": inprocess_rounds,
        "inprocess_round_median_s": statistics.median(inprocess_rounds),
        "ratio_median": statistics.median(deployed_rounds) / statistics.median(inprocess_rounds),
        "deployed_total_with_setup_s": total,
        "bytes_down_per_device_per_round": payload,
        "bytes_up_per_device_per_round": payload,
        "folder": str(root),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", choices=["recommend", "store", "deployment"], help="what to measure"
    )
    parser.add_argument("--calls", type=int, default=500, help="recommend: warm calls timed")
    parser.add_argument(
        "--cold", type=int, default=20, help="recommend: store opens, one call each"
    )
    parser.add_argument(
        "--single", type=int, default=300, help="store: events recorded one per call"
    )
    parser.add_argument(
        "--batches", type=int, default=5, help="store: batches of the whole history"
    )
    parser.add_argument("--rounds", type=int, default=3, help="deployment: rounds of the run")
    args = parser.parse_args(argv)
    result = {"recommend": recommend, "store": store, "deployment": deployment}[args.mode](args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
