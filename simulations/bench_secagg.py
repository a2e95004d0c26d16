"""Secure aggregation (SecAgg+) under user-level DP: round time against plain aggregation, and
rounds in which 30 % of the sampled clients drop out mid-round.

    python simulations/bench_secagg.py simulation --rounds 5 --output runs/bench-secagg
    python simulations/bench_secagg.py deployment --nodes 10 --rounds 2 \
        --output runs/bench-secagg-deployment

``simulation``: MovieLens-100K, one client per user (943), HSTU (ml-100k-federated.yaml with
max_len 50 and one local epoch), user-level DP-FedAvg (σ ``--sigma``, default 1; C 0.5;
Poisson sampling of ``--clients-per-round``); each variant runs in the in-process engine and, with ``--flower``,
under Flower's simulation too. ``deployment``: the same model on ``--nodes`` loopback
SuperNodes (Flower's SuperLink, SuperNodes and ``flwr run``), each holding the store of one
silo of ML-100K users (hash partitioning), every node sampled each round.

SecAgg+ shares over ``--num-shares`` neighbours (default 1.0: the whole cohort) with threshold
``--threshold`` (0.6). Variants: ``plain`` (DP-FedAvg, the server sees each clipped update),
``secagg-central``, ``secagg-distributed`` and ``secagg-distributed`` with ``secagg-drop-out``
0.3 (that share of the sampled clients fails after the keys were shared, before sending its
masked update). Per
variant: median round seconds (sampling to aggregation, from metrics.jsonl), its ratio to
plain, clients that contributed and dropped per round, how far the model moved
(‖final − initial‖ / ‖initial‖) and test NDCG@10 after the last round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from clients.secagg import DROP_OUT, DROP_OUT_ENV
from fedrec.config import load_config, parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.federated_models import initial_federated_model
from fedrec.federation.layout import CATALOGUE_FILE
from fedrec.population import population_of
from simulations.inprocess import run_inprocess

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "ml-100k-federated.yaml"
VARIANTS: dict[str, tuple[dict[str, Any] | None, float]] = {  # secure_aggregation, drop-out
    "plain": (None, 0.0),
    "secagg-central": ({"noise": "central"}, 0.0),
    "secagg-distributed": ({"noise": "distributed"}, 0.0),
    "secagg-distributed-30%-drop-out": ({"noise": "distributed"}, 0.3),
}


def config_data(args: argparse.Namespace, secure: dict[str, Any] | None) -> dict[str, Any]:
    data = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    data["data"]["path"] = str((REPO / data["data"]["path"]).resolve())
    data["model"]["max_len"] = 50
    data["audit"] = {"enabled": False}
    federated = data["federated"]
    federated.update(
        num_rounds=args.rounds,
        eval_every=args.rounds,
        clients_per_round=args.clients_per_round,
        local_epochs=1,
        central_dp={"noise_multiplier": args.sigma, "clipping_norm": 0.5, "sampling": "poisson"},
    )
    if args.mode == "deployment":
        federated.update(
            partitioning="hash",
            num_partitions=args.nodes,
            clients_per_round=args.nodes,
            round_timeout=args.timeout,
        )
        federated["central_dp"]["sampling"] = "fixed"
    if secure is not None:
        graph = {"num_shares": args.num_shares, "reconstruction_threshold": args.threshold}
        federated["secure_aggregation"] = {**secure, **graph}
    return data


def summary(run_dir: Path, config_path: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    catalogue = ItemCatalogue.load(run_dir / CATALOGUE_FILE)
    initial = initial_federated_model(load_config(config_path), catalogue, run_dir).shared_state()
    final = torch.load(run_dir / "model.pt", weights_only=True)
    moved = sum(float(((final[k] - v) ** 2).sum()) for k, v in initial.items()) ** 0.5
    size = sum(float((v**2).sum()) for v in initial.values()) ** 0.5
    train = [line.get("train", {}) for line in lines]
    return {
        "round_seconds_median": statistics.median(line["seconds"] for line in lines),
        "contributors_per_round": [t.get("dp-replies") for t in train],
        "dropped_per_round": [t.get("secagg-dropped", 0) for t in train],
        "model_moved_relative": moved / size,
        "test_ndcg10": lines[-1]["test"]["NDCG@10"],
    }


def simulation(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    table: dict[str, Any] = {}
    engines = ["in-process", "flower"] if args.flower else ["in-process"]
    for name, (secure, drop) in VARIANTS.items():
        for engine in engines:
            run_dir = output / f"{engine}-{name}"
            data = config_data(args, secure)
            data["output_dir"] = str(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir.with_suffix(".yaml")
            config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
            if engine == "in-process":
                population = population_of(parse_config(data, str(config_path)))
                os.environ[DROP_OUT_ENV] = str(drop)
                try:
                    run_inprocess(population, run_dir, progress=False)
                finally:
                    del os.environ[DROP_OUT_ENV]
            else:
                env = {**os.environ, DROP_OUT_ENV: str(drop)}
                command = [sys.executable, "-m", "fedrec.cli", "simulate", "-c", str(config_path)]
                with (output / f"{engine}-{name}.log").open("w") as log:
                    subprocess.run(command, env=env, stdout=log, stderr=log, check=True)
            table[f"{engine}/{name}"] = summary(run_dir, config_path)
            print(f"{engine}/{name}: {table[f'{engine}/{name}']}", flush=True)
    return table


def deployment(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    from tests.processes import deploy_on_loopback

    table: dict[str, Any] = {}
    for name, (secure, drop) in VARIANTS.items():
        if name == "secagg-central":
            continue  # the same protocol as distributed: only where the noise is added differs
        work = output / f"deployment-{name}"
        run_dir = work / "run"
        data = config_data(args, secure)
        data["output_dir"] = str(run_dir)
        work.mkdir(parents=True, exist_ok=True)
        config_path = work / "deploy.yaml"
        config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        population = population_of(load_config(config_path))
        devices = [work / f"device-{p}" for p in range(args.nodes)]
        for partition, device in enumerate(devices):
            population.write_store(device / "store", partition)
        deploy_on_loopback(
            work, config_path, run_dir, devices, f"{DROP_OUT}={drop}", args.rounds * 900
        )
        table[f"deployment/{name}"] = summary(run_dir, config_path)
        print(f"deployment/{name}: {table[f'deployment/{name}']}", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("simulation", "deployment"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients-per-round", type=int, default=50, help="simulation only")
    parser.add_argument("--flower", action="store_true", help="also under Flower's simulation")
    parser.add_argument("--nodes", type=int, default=10, help="deployment: SuperNodes")
    parser.add_argument("--timeout", type=float, default=300.0, help="deployment: round timeout")
    parser.add_argument(
        "--num-shares",
        type=lambda v: float(v) if "." in v else int(v),
        default=1.0,
        help="secure_aggregation.num_shares: a fraction of the cohort, or an odd count",
    )
    parser.add_argument(
        "--threshold",
        type=lambda v: float(v) if "." in v else int(v),
        default=0.6,
        help="secure_aggregation.reconstruction_threshold",
    )
    parser.add_argument(
        "--sigma", type=float, default=1.0, help="central_dp.noise_multiplier (0: no noise)"
    )
    parser.add_argument("--output", default="runs/bench-secagg", help="folder for the runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    torch.set_num_threads(1)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    table = simulation(args, output) if args.mode == "simulation" else deployment(args, output)
    for key, row in table.items():  # side by side with plain in the same engine and run
        plain = table[f"{key.split('/')[0]}/plain"]["round_seconds_median"]
        row["round_time_vs_plain"] = row["round_seconds_median"] / plain
    result = {"setup": vars(args), "table": table}
    (output / f"secagg-{args.mode}.json").write_text(json.dumps(result, indent=2), "utf-8")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
