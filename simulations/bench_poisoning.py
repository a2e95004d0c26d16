"""Model poisoning: a share of hostile clients against the server's defences.

    python simulations/bench_poisoning.py --rounds 30 --output runs/bench-poisoning

A synthetic population of one-user clients (the `bench_federated.py` workload, FedAvg, no
DP), of which every tenth client is hostile. Each attack replaces a hostile client's train
reply: ``scaled`` (its update × 5, inside the validator's 10×-median norm bound), ``sign-flip``
(its update × −5) and ``random-huge-weight`` (random weights, num-examples 10⁹). Each is run
undefended (FedAvg behind the server's reply validation, which is always on) and with each
robust rule of ``fedrec.federation.strategies``; the table gives test NDCG@10 after the last
round and its ratio to the clean run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from clients.app import app as client_app
from fedrec.config import parse_config
from fedrec.population import population_of
from simulations.bench_federated import synthetic_config
from simulations.inprocess import run_inprocess

Attack = Callable[[list[np.ndarray], list[np.ndarray], np.random.Generator], list[np.ndarray]]
ATTACKS: dict[str, tuple[Attack, int | None]] = {  # what the update becomes, its weight
    "scaled": (
        lambda new, old, _rng: [o + 5 * (n - o) for n, o in zip(new, old, strict=True)],
        None,
    ),
    "sign-flip": (
        lambda new, old, _rng: [o - 5 * (n - o) for n, o in zip(new, old, strict=True)],
        None,
    ),
    "random-huge-weight": (
        lambda new, _old, rng: [rng.normal(0, 1, n.shape).astype(n.dtype) for n in new],
        10**9,
    ),
}
DEFENCES = ("fedavg", "krum", "multikrum", "trimmedmean", "median", "bulyan")


def hostile(attack: str, every: int) -> Callable[[Message, Context], Message]:
    """The ClientApp, except that clients ``partition % every == 0`` answer a train message
    with ``attack``'s update."""
    change, weight = ATTACKS[attack]
    rng = np.random.default_rng(0)

    def answer(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        partition = int(context.node_config["partition-id"])
        if (
            message.metadata.message_type != MessageType.TRAIN
            or partition % every
            or reply.has_error()
        ):
            return reply
        arrays = reply.content.array_records["arrays"]
        old = message.content.array_records["arrays"].to_numpy_ndarrays()
        new = change(arrays.to_numpy_ndarrays(), old, rng)
        reply.content["arrays"] = ArrayRecord(
            {
                k: Array(np.asarray(v, dtype=o.dtype))
                for k, v, o in zip(arrays, new, old, strict=True)
            }
        )
        if weight is not None:
            metrics = dict(reply.content.metric_records["metrics"])
            reply.content["metrics"] = MetricRecord({**metrics, "num-examples": weight})
        return reply

    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000, help="synthetic one-user clients")
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="every N-th client is hostile")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    parser.add_argument("--output", default="runs/bench-poisoning", help="folder for the runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    torch.set_num_threads(1)
    output = Path(args.output)
    data = synthetic_config(args.users, args.clients_per_round, args.rounds)
    # Hostile clients expected per round, which Krum, MultiKrum and Bulyan assume.
    data["federated"].update(
        malicious_clients=max(1, round(args.clients_per_round / args.every)),
        krum_select=args.clients_per_round // 2,
        eval_every=args.rounds,
    )
    base = parse_config(data, "bench_poisoning")
    population = population_of(base)

    def run(name: str, strategy: str, client: Callable[[Message, Context], Message]) -> float:
        config = dataclasses.replace(
            base, federated=dataclasses.replace(base.federated, strategy=strategy)
        )
        results = run_inprocess(
            dataclasses.replace(population, config=config),
            output / name,
            progress=False,
            client=client,
        )
        ndcg = float(results["final"]["test"]["NDCG@10"])
        print(f"{name}: test NDCG@10 {ndcg:.4f}", flush=True)
        return ndcg

    table: dict[str, Any] = {"clean": run("clean", "fedavg", client_app)}
    for attack in args.attacks:
        for defence in args.defences:
            table[f"{attack}/{defence}"] = run(
                f"{attack}-{defence}", defence, hostile(attack, args.every)
            )
    clean = table["clean"]
    summary = {
        "setup": vars(args),
        "ndcg": table,
        "ratio_to_clean": {k: v / clean for k, v in table.items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "poisoning.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary["ratio_to_clean"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
