"""The federated run of a config without Flower's runtime: an in-process reference loop.

    python simulations/inprocess.py --config configs/ml-100k-federated.yaml --rounds 100 \
        --eval-every 10 --output runs/inprocess-ml100k

Why it exists: a Flower simulation costs ≈ 50–70 ms per client message on this machine
(STACK-NOTES), so sweeps with hundreds of rounds or 1000+ clients per round (the
privacy–utility table) would be dominated by the framework, and the benchmark "Flower round vs
a bare loop" needs the bare loop. It runs the same client code (``local_train``, the same seeds,
Flower's client-side clipping helper) and drives the very strategy object the ServerApp builds
(``server.strategy.build_strategy``: FedAvg/FedAvgM/FedProx/FedAdam and the DP-FedAvg wrapper,
so sampling, aggregation, server optimizer and noise are Flower's code), through a grid that
answers in this process instead of over the network; it records the same ledger events.
``tests/test_inprocess.py`` checks it reproduces the Flower simulation's model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.task_identity import TaskIdentity
from tqdm import tqdm

from fedrec.audits import audit_round
from fedrec.audits.report import write_audit_report
from fedrec.config import parse_config
from fedrec.evaluation import evaluate
from fedrec.experiment import environment, write_json_atomic
from fedrec.federation import (
    CLIENT_STATE_DIR,
    Population,
    build_federated_model,
    central_event,
    client_personal_path,
    client_seed,
    epsilons_so_far,
    noise_seed,
    planned_record_event,
    population_of,
    privacy_disclosures,
    reply_weight,
)
from fedrec.privacy import PrivacyBudget, PrivacyLedger
from fedrec.privacy.report import write_privacy_report
from fedrec.training import seed_everything
from server.strategy import LedgerKeeper, build_strategy

log = logging.getLogger("fedrec.inprocess")


def _arrays(keys: Iterable[str], values: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in zip(keys, values, strict=True)})


def _reply(instruction: Message, arrays: ArrayRecord, weight: int) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": weight})})
    TaskIdentity.node_id = instruction.metadata.dst_node_id  # the reply's sender
    return Message(content, reply_to=instruction)


class InProcessGrid:
    """The part of Flower's ``Grid`` a strategy's ``configure_train`` uses: the connected node
    IDs, here partition + 1 for every client (Flower's node IDs are never 0)."""

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        # Flower stamps every Message with its run and sender; outside a Flower process there
        # is neither, so this loop is run and task 0 and the server node 0.
        TaskIdentity.run_id = TaskIdentity.task_id = 0
        TaskIdentity.node_id = 0

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.num_clients + 1)

    @staticmethod
    def partition(message: Message) -> int:
        return message.metadata.dst_node_id - 1


def run_inprocess(
    population: Population,
    run_dir: Path,
    eval_every: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``population.config``'s federation in this process; write metrics, ledger, report."""
    config, fed = population.config, population.config.federated
    audit = config.audit if config.audit.enabled else None
    if audit is not None and audit.mode == "federated":
        raise ValueError(
            "the in-process loop audits on the server (audit.mode: server); the federated "
            "audit needs client replies: run it with fedrec simulate"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    split = population.split
    if config.llm is not None:
        from fedrec.llm_rec.federated import ensure_foundation

        ensure_foundation(population, run_dir, progress)
    model = build_federated_model(population, run_dir)
    worker = build_federated_model(population, run_dir)
    num_clients = len(population.partitions)
    sampled = fed.sampled_clients(num_clients)
    # The simulated devices of this loop are new in every run: their ledgers live in memory.
    ledger = PrivacyLedger()
    central = fed.central_dp

    def may_start(round_number: int) -> bool:
        """As the ServerApp: no round that would take the federation past its ε budget."""
        if central is None or central.target_epsilon is None:
            return True
        delta, next_event = (
            central.delta_for(num_clients),
            central_event(fed, num_clients, round_number),
        )
        return ledger.epsilon("server", delta, extra=next_event) <= central.target_epsilon

    if not may_start(1):
        raise ValueError(
            f"central_dp.target_epsilon {central and central.target_epsilon} is below the ε of one "
            "round: raise central_dp.noise_multiplier or the budget"
        )
    # The ledger is kept below, per client; LedgerKeeper adds the server's handling of rounds
    # where nobody trained.
    strategy = LedgerKeeper(
        build_strategy(fed, num_clients, config.seed), lambda *_: None, may_start
    )
    grid = InProcessGrid(num_clients)
    flower_log = logging.getLogger("flwr")
    flower_level, _ = flower_log.level, flower_log.setLevel(logging.WARNING)  # no per-round INFO
    stopped = ""
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    metrics_path, audit_path = run_dir / "metrics.jsonl", run_dir / "audit.jsonl"
    metrics_path.unlink(missing_ok=True)
    audit_path.unlink(missing_ok=True)
    shutil.rmtree(run_dir / CLIENT_STATE_DIR, ignore_errors=True)  # personal prompts of a past run
    rounds = tqdm(range(1, fed.num_rounds + 1), desc="rounds", disable=not progress)
    for round_number in rounds:
        round_started = time.perf_counter()
        global_arrays = ArrayRecord(model.shared_state())
        global_numpy = global_arrays.to_numpy_ndarrays()
        replies = []
        TaskIdentity.node_id = 0
        instructions = strategy.configure_train(round_number, global_arrays, ConfigRecord(), grid)
        refused = 0
        for instruction in sorted(instructions, key=InProcessGrid.partition):
            partition = InProcessGrid.partition(instruction)
            client_split = population.client_split(partition)
            records = worker.record_count(client_split, fed) if fed.record_dp else 0
            planned = planned_record_event(fed, records, partition, round_number)
            if (
                planned is not None
                and fed.record_epsilon_budget is not None
                and not PrivacyBudget(fed.record_epsilon_budget, planned.delta).allows(
                    ledger, planned
                )
            ):
                refused += 1  # as the ClientApp: reply with the global model, unchanged
                replies.append(_reply(instruction, global_arrays, 0))
                continue
            worker.load_shared_state(model.shared_state())
            result = worker.train_local(
                client_split,
                fed,
                client_seed(config.seed, round_number, partition),
                client_personal_path({"run-dir": str(run_dir)}, {"partition-id": partition}, ""),
                noise_seed(fed, config.seed, round_number, partition),
            )
            arrays = ArrayRecord(worker.shared_state())
            if central is not None:
                update = arrays.to_numpy_ndarrays()
                if any(np.any(u != g) for u, g in zip(update, global_numpy, strict=True)):
                    compute_clip_model_update(update, global_numpy, central.clipping_norm)
                arrays = _arrays(arrays.keys(), update)
            if result.dp is not None and planned is not None:
                ledger.record(dataclasses.replace(planned, steps=result.dp.steps))
            replies.append(_reply(instruction, arrays, reply_weight(result, fed)))
        aggregated, _ = strategy.aggregate_train(round_number, replies)
        if central is not None:
            ledger.record(central_event(fed, num_clients, round_number))
        if aggregated is not None:  # None: nobody trained (every sampled client refused)
            model.load_shared_state(aggregated.to_torch_state_dict())
        record: dict[str, Any] = {
            "round": round_number,
            "clients": len(replies),
            "refused": refused,
            "seconds": time.perf_counter() - round_started,
        }
        last = round_number == fed.num_rounds or not may_start(round_number + 1)
        if round_number % (eval_every or fed.eval_every) == 0 or last:
            scorer = model.scorer(split, torch.device("cpu"))
            record["valid"] = evaluate(scorer, split, "valid", config.evaluation).metrics
            top_n = audit.k if audit is not None else 0
            tested = evaluate(scorer, split, "test", config.evaluation, top_n=top_n)
            record["test"] = tested.metrics
            if audit is not None:
                line = audit_round(
                    scorer,
                    population.audit_context,
                    audit,
                    config.evaluation,
                    round_number,
                    config.seed,
                    tested if audit.stage == "test" else None,
                )
                record["audit_seconds"] = line["seconds"]
                with audit_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")
            rounds.set_postfix(valid=f"{record['valid'][config.train.monitor]:.4f}")
        record["epsilon"] = epsilons_so_far(ledger, fed, num_clients)
        history.append(record)
        with metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if last and round_number < fed.num_rounds:
            stopped = f"round {round_number + 1} would exceed the federation's ε budget"
            log.warning("stopping: %s", stopped)
            break
    flower_log.setLevel(flower_level)
    model.export(run_dir)
    evaluated = [h for h in history if "valid" in h]
    best = max(evaluated, key=lambda h: h["valid"][config.train.monitor])
    results = {
        "engine": "in-process",
        "clients": num_clients,
        "clients_per_round": sampled,
        "rounds": history[-1]["round"],
        "stopped_early": stopped,
        "final": history[-1],
        "best_valid": best,
        "wall_seconds": time.perf_counter() - started,
        "config": config.to_dict(),
        "environment": environment(),
    }
    write_json_atomic(results, run_dir / "results.json")
    write_privacy_report(ledger, run_dir, privacy_disclosures(config, history))
    if audit is not None:
        write_audit_report(run_dir)
    return results


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
    monitor = config.train.monitor
    print(
        f"best valid {monitor} {results['best_valid']['valid'][monitor]:.4f} "
        f"(round {results['best_valid']['round']}), its test {monitor} "
        f"{results['best_valid']['test'][monitor]:.4f}; {results['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
