"""The federated run of a config without Flower's runtime: the same round loop, strategies and
ClientApp as ``fedrec simulate``, with messages handed over in this process.

    python simulations/inprocess.py --config configs/ml-100k-federated.yaml --rounds 100 \
        --eval-every 10 --output runs/inprocess-ml100k

Why it exists: a Flower simulation costs ≈ 50–70 ms per client message on this machine
(STACK-NOTES), so sweeps with hundreds of rounds or 1000+ clients per round (the
privacy–utility table) would be dominated by the framework, and the benchmark "Flower round vs
a bare loop" needs the bare loop. Only the transport differs: ``InProcessGrid`` calls the
ClientApp (``clients.app.app``, Flower's own dispatch) for each message, and
``server.rounds.run_federation`` is the ServerApp's loop. Simulated devices keep their ledgers
in ``RUN/devices`` as under ``fedrec simulate`` (fedrec never deletes one: remove the folder,
or use a new ``--output``, to simulate new devices); each device's store is written when the
device is first contacted. ``tests/test_inprocess.py`` checks that both engines give the same
model, ledger, ε, metrics, audit lines and results schema.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedrec.config import parse_config
from fedrec.federation.cohort import node_count
from fedrec.federation.layout import STORE_DIR, simulated_store
from fedrec.population import Population, population_of
from server.rounds import run_federation

log = logging.getLogger("fedrec.inprocess")


class InProcessGrid:
    """The part of Flower's ``Grid`` the round loop uses, answered in this process: node IDs
    partition + 1 for every client (Flower's node IDs are never 0), and ``send_and_receive``
    running ``client`` on each message with that node's context."""

    def __init__(
        self,
        num_clients: int,
        client: Callable[[Message, Context], Message] | None = None,
        run_config: dict[str, Any] | None = None,
        population: Population | None = None,
        run_dir: Path | None = None,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ):
        self.num_clients = num_clients
        self.node_configs = node_configs or {}  # more node config by partition (a device's store)
        self.client = client
        self.run_config = run_config or {}
        self.population, self.run_dir = population, run_dir
        self.stored: set[int] = set()
        # A node's context lives as long as the run, as on a SuperNode (SecAgg+ keeps its
        # keys there between the stages of a round).
        self.contexts: dict[int, Context] = {}
        # Flower stamps every Message with its run and sender; outside a Flower process there
        # is neither, so this loop is run and task 0 and the server node 0.
        TaskIdentity.run_id = TaskIdentity.task_id = 0
        TaskIdentity.node_id = 0

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.num_clients + 1)

    @staticmethod
    def partition(message: Message) -> int:
        return message.metadata.dst_node_id - 1

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        assert self.client is not None, "a grid without a client only lists node IDs"
        replies = []
        for sent in sorted(messages, key=self.partition):
            # A transport hands every node its own copy (Flower's SecAgg+ sends one content
            # object to the whole cohort, and its client mod edits what it receives).
            message = copy.deepcopy(sent)
            partition = self.partition(message)
            if self.population is not None and partition not in self.stored:
                assert self.run_dir is not None
                self.population.write_store(simulated_store(self.run_dir, partition), partition)
                self.stored.add(partition)
            context = self.contexts.setdefault(
                partition,
                Context(
                    run_id=0,
                    node_id=message.metadata.dst_node_id,
                    node_config={
                        "partition-id": partition,
                        "num-partitions": self.num_clients,
                        **self.node_configs.get(partition, {}),
                    },
                    state=RecordDict(),
                    run_config=self.run_config,
                ),
            )
            TaskIdentity.node_id = message.metadata.dst_node_id  # the reply's sender
            try:
                replies.append(self.client(message, context))
            except Exception as err:  # as a SuperNode: the server gets an error reply
                log.exception("client %d raised", partition)
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}")
                replies.append(Message(error, reply_to=message))
            finally:
                TaskIdentity.node_id = 0
        return replies


def run_inprocess(
    population: Population,
    run_dir: Path,
    eval_every: int | None = None,
    progress: bool = True,
    client: Callable[[Message, Context], Message] = client_app,
) -> dict[str, Any]:
    """Run ``population.config``'s federation in this process; write what ``fedrec simulate``
    writes (metrics, audit, ledger, reports, ``results.json``). ``client`` answers every
    message (the ClientApp; a benchmark may wrap it, e.g. to make some clients hostile)."""
    config = population.config
    if eval_every is not None:
        config = dataclasses.replace(
            config, federated=dataclasses.replace(config.federated, eval_every=eval_every)
        )
        population = dataclasses.replace(population, config=config)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"  # what the ClientApp reads, as under fedrec simulate
    resolved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    shutil.rmtree(run_dir / STORE_DIR, ignore_errors=True)  # the last run's simulated data
    cohort = config.federated.users_per_node > 1  # a node hosts many clients' stores
    grid = InProcessGrid(
        node_count(len(population.partitions), config.federated.users_per_node),
        client,
        {"config": str(resolved), "run-dir": str(run_dir)},
        None if cohort else population,
        run_dir,
    )
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(logging.WARNING)  # the strategies' per-round INFO lines
    try:
        return run_federation(
            population, run_dir, grid, engine="in-process", write_stores=cohort, progress=progress
        )
    finally:
        flower_log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment YAML with a federated: part")
    parser.add_argument("--rounds", type=int, help="override federated.num_rounds")
    parser.add_argument("--clients-per-round", type=int, help="override clients_per_round")
    parser.add_argument(
        "--eval-every", type=int, help="evaluate every N rounds (default: federated.eval_every)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", required=True, help="run folder")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a federated field, e.g. --set local_epochs=5 "
        '--set central_dp=\'{"noise_multiplier": 1.0, "clipping_norm": 0.5}\'',
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    federated = data.setdefault("federated", {})
    for item in args.set:
        key, _, value = item.partition("=")
        federated[key] = json.loads(value)
    if args.rounds:
        federated["num_rounds"] = args.rounds
    if args.clients_per_round:
        federated["clients_per_round"] = args.clients_per_round
    config = parse_config(data, args.config)
    results = run_inprocess(population_of(config), Path(args.output), args.eval_every)
    monitor, best = config.train.monitor, results["best_valid"]
    print(
        f"best valid {monitor} {best['valid'][monitor]:.4f} (round {best['round']}), its test "
        f"{monitor} {best['test'][monitor]:.4f}; {results['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
