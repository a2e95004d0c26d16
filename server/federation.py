"""The server's side of every round, whichever grid carries the messages: ledger events,
ε so far and the stop on the federation's budget, the evaluation schedule, the round's lines in
``metrics.jsonl`` and ``audit.jsonl``, the checkpoint, and at the end ``results.json`` and the
reports. ``server.rounds`` drives it over Flower's grid (the ServerApp) or the in-process one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedrec.audits import audit_line, audit_round
from fedrec.audits.federated import PREFIX as AUDIT_PREFIX
from fedrec.audits.federated import Sums, add_sums, audit_from_sums
from fedrec.audits.report import write_audit_report
from fedrec.data.catalogue import ItemCatalogue
from fedrec.evaluation import EvalResult, evaluate, evaluation_users, popularity_scorer
from fedrec.evaluation.evaluator import Scorer
from fedrec.experiment import environment, write_json_atomic
from fedrec.federated_models import initial_federated_model
from fedrec.federation.layout import CHECKPOINT_FILE, CLIENT_STATE_DIR, DEVICE_DIR, ROUND_LOGS
from fedrec.federation.privacy import (
    DP_METRICS,
    central_event,
    epsilon_text,
    epsilons_so_far,
    exposure_event,
    privacy_disclosures,
    reported_record_event,
    server_view_event,
)
from fedrec.federation.secure import MASKED
from fedrec.files import load_checkpoint, save_atomic
from fedrec.population import Population
from fedrec.privacy import PrivacyBudget, PrivacyLedger
from fedrec.privacy.report import write_privacy_report
from fedrec.training import resolve_device
from server.strategy import load_strategy_state, strategy_state

log = logging.getLogger("fedrec.server")
LEDGER_JOURNAL = "ledger.json"  # the ledger as of the last replies (the checkpoint's may lag)
TRAIN_FACTS = (
    "train-loss",
    "dp-replies",
    "rejected",
    "secagg-sampled",
    "secagg-declined",
    "secagg-dropped",
    "clipping-norm",  # user-level DP's C of the round (adaptive clipping moves it)
    "within-clip-fraction",  # adaptive clipping's noised fraction of updates within C
)  # of a round's aggregated train metrics, logged


class Federation:
    """The server's state across rounds: global model, ledger, metrics and checkpoints."""

    def __init__(
        self,
        population: Population,
        catalogue: ItemCatalogue,
        run_dir: Path,
        resume: bool,
        strategy: Strategy,
        engine: str,
    ):
        self.population = population
        self.config = population.config
        self.fed = self.config.federated
        self.run_dir = run_dir
        self.engine = engine
        self.device = resolve_device(self.config.train.device)
        self.model = initial_federated_model(self.config, catalogue, run_dir).to(self.device)
        self.ledger = PrivacyLedger()
        self.rounds_done = 0
        self.num_clients = len(population.partitions)
        self.sampled = self.fed.sampled_clients(self.num_clients)
        self.strategy = strategy
        self.audit = self.config.audit if self.config.audit.enabled else None
        self.pending_audit: dict[str, Any] | None = None  # the federated audit of this round
        self.failure = ""  # set when every sampled client of a round failed
        secure = self.fed.secure_aggregation
        # SecAgg+ with distributed noise: each user's ε against the server itself, too
        self.books_server_view = secure is not None and secure.noise == "distributed"
        self.replies = self.refused = self.withheld = 0
        # node ID -> the client it runs, as the node identified itself (server.rounds): the
        # only source of who a reply is from
        self.partition_of: dict[int, int] = {}
        checkpoint = run_dir / CHECKPOINT_FILE
        if resume:
            if not checkpoint.exists():
                raise FileNotFoundError(
                    f"{checkpoint}: --resume needs the checkpoint of an earlier run in this "
                    "folder (starting again would reset the federation's ledger): drop --resume "
                    "to start a new run, or point --output-dir at the run to continue"
                )
            self._restore(load_checkpoint(checkpoint))
            log.info("resumed from %s at round %d", checkpoint, self.rounds_done)
        else:
            for log_file in (*ROUND_LOGS, LEDGER_JOURNAL):
                (run_dir / log_file).unlink(missing_ok=True)
            shutil.rmtree(run_dir / CLIENT_STATE_DIR, ignore_errors=True)  # last run's prompts
            carried = list((run_dir / DEVICE_DIR).glob("client-*.json"))
            if carried:
                log.warning(
                    "%d simulated devices in %s keep the ε of earlier runs (their budgets count "
                    "it; fedrec never deletes a ledger): remove the folder to simulate new devices",
                    len(carried),
                    run_dir / DEVICE_DIR,
                )

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_shared_state(state["model"])
        self.ledger.load_state_dict(state["ledger"])
        journal = self.run_dir / LEDGER_JOURNAL
        if journal.exists():
            # Clients' releases of a round that was interrupted after its replies arrived:
            # they happened (the clients' ledgers hold them), so the server's ledger keeps
            # them. The server's own noised aggregate of that round was never published.
            journaled = PrivacyLedger()
            journaled.load_state_dict(json.loads(journal.read_text(encoding="utf-8")))
            known = len(self.ledger.events)
            if journaled.events[:known] == self.ledger.events:
                extra = [e for e in journaled.events[known:] if e.party != "server"]
                for event in extra:
                    self.ledger.record(event)
                if extra:
                    log.warning(
                        "%d client releases of an interrupted round kept from %s",
                        len(extra),
                        journal.name,
                    )
        self.rounds_done = int(state["round"])
        load_strategy_state(self.strategy, _numpy(state["strategy"]))
        python = state["rng"]["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        np.random.set_state(_numpy(state["rng"]["numpy"]))
        torch.set_rng_state(state["rng"]["torch"])
        # A kill between a log line and the checkpoint leaves a line for a round that will
        # run again: keep only the rounds the checkpoint holds.
        for log_file in ROUND_LOGS:
            path = self.run_dir / log_file
            if path.exists():
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if json.loads(line)["round"] <= self.rounds_done
                ]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def checkpoint(self, round_number: int) -> None:
        save_atomic(
            {
                "round": round_number,
                "model": self.model.shared_state(),
                "ledger": self.ledger.state_dict(),
                # numpy arrays as tensors: the file loads with weights_only=True (no pickle)
                "strategy": _tensors(strategy_state(self.strategy)),
                "rng": {
                    "python": random.getstate(),
                    "numpy": _tensors(np.random.get_state()),
                    "torch": torch.get_rng_state(),
                },
                "config": self.config.to_dict(),
            },
            self.run_dir / CHECKPOINT_FILE,
        )

    def may_start(self, round_number: int) -> bool:
        """Whether round ``round_number`` keeps the federation within its ε budget."""
        central = self.fed.central_dp
        if central is None or central.target_epsilon is None:
            return True
        next_event = central_event(self.fed, self.num_clients, round_number)
        delta = central.delta_for(self.num_clients)
        return self.ledger.epsilon("server", delta, extra=next_event) <= central.target_epsilon

    def may_train(self, node: int) -> bool:
        """Whether a sampled node is asked to train: not when the server's own ledger shows
        its client past ``record_epsilon_budget`` with one more release like its last (a
        device that lost its ledger would otherwise train again)."""
        budget = self.fed.record_epsilon_budget
        partition = self.partition_of.get(node)
        if budget is None or partition is None:
            return True
        party = f"client:{partition}"
        spent = [e for e in self.ledger.events if e.party == party and e.mechanism == "dp-sgd"]
        if not spent:
            return True
        allowed = PrivacyBudget(budget, spent[-1].delta).allows(self.ledger, spent[-1])
        if not allowed:
            self.withheld += 1
            log.warning(
                "client %d is past its ε budget in the server's ledger: not asked", partition
            )
        return allowed

    def _client_of(self, reply: Message) -> int | None:
        partition = self.partition_of.get(reply.metadata.src_node_id)
        if partition is None:
            log.warning("a reply from unidentified node %d: ignored", reply.metadata.src_node_id)
        return partition

    def on_replies(self, round_number: int, replies: list[Message]) -> None:
        """The round's train replies: their DP-SGD releases and the server's own into the ledger."""
        ok = [r for r in replies if not r.has_error()]
        if replies and not ok:  # (a Poisson round may sample nobody: still a noised release)
            self.failure = (
                f"round {round_number}: none of the {len(replies)} sampled clients replied "
                "without an error (their tracebacks are in the log above); the checkpoint holds "
                "the last complete round, fix the cause and rerun with --resume"
            )
            return  # nothing is aggregated, so nothing is released
        self.replies, self.refused = len(ok), 0
        for reply in ok:
            metrics = reply.content.metric_records["metrics"]
            self.refused += int(cast(int, metrics.get("refused", 0)))
            partition = self._client_of(reply)
            if partition is not None and int(cast(int, metrics.get("dp-steps", 0))) > 0:
                dp = {key: cast(float, metrics[key]) for key in DP_METRICS}
                self.ledger.record(reported_record_event(self.fed, partition, round_number, dp))
            if partition is not None and metrics.get(MASKED) and self.books_server_view:
                event = server_view_event(self.fed, self.num_clients, partition, round_number)
                self.ledger.record(event)
        if self.fed.central_dp is not None:
            self.ledger.record(central_event(self.fed, self.num_clients, round_number))
        # Written before the aggregate exists: a kill from here on loses no release.
        write_json_atomic(self.ledger.state_dict(), self.run_dir / LEDGER_JOURNAL)

    def evaluated(self, round_number: int) -> bool:
        """Whether this round's global model is evaluated (``federated.eval_every``; round 0,
        the initial model, only when every round is)."""
        every = self.fed.eval_every
        if round_number == 0:
            return every == 1
        return round_number % every == 0 or round_number >= self.fed.num_rounds

    def end_round(
        self,
        round_number: int,
        arrays: ArrayRecord,
        seconds: float,
        last: bool,
        train_metrics: MetricRecord | None = None,
    ) -> str | None:
        """Load the round's global model, evaluate it on schedule (and after the ``last``
        round), write the round's lines and the checkpoint; the reason to stop, if any.
        ``train_metrics``: the strategy's aggregate of the replies (the clients' mean
        ``train-loss`` when they report it; under user-level DP the replies it used)."""
        self.model.load_shared_state(arrays.to_torch_state_dict())
        record: dict[str, Any] = {"round": round_number}
        audit = None
        if self.evaluated(round_number) or last:
            split, evaluation = self.population.split, self.config.evaluation
            scorer = self.model.scorer(split, self.device)
            users = evaluation_users(split, evaluation)
            # The audit reads every user's top-K: from the test evaluation unless it sampled.
            audited = (
                self.audit is not None
                and self.audit.mode == "server"
                and round_number > 0
                and users is None
            )
            top_n = self.audit.k if self.audit is not None and audited else 0
            record["valid"] = evaluate(scorer, split, "valid", evaluation, users).metrics
            tested = evaluate(scorer, split, "test", evaluation, users, top_n=top_n)
            record["test"] = tested.metrics
            if users is not None:
                record["evaluated_users"] = len(users)
            if round_number > 0:
                audit = self._audit(scorer, round_number, tested if audited else None)
            monitor = self.config.train.monitor
            log.info(
                "round %d: valid %s %.4f  test %s %.4f  clients %s%s",
                round_number,
                monitor,
                record["valid"][monitor],
                monitor,
                record["test"][monitor],
                self.replies if round_number else "-",
                epsilon_text(self.epsilons()) if round_number else "",
            )
        if round_number == 0:  # the initial model: nothing trained, nothing logged
            return None
        record.update(
            clients=self.replies,
            refused=self.refused,
            withheld=self.withheld,
            seconds=seconds,
            epsilon=self.epsilons(),
        )
        self.withheld = 0
        kept = {k: v for k, v in (train_metrics or {}).items() if k in TRAIN_FACTS}
        if kept:
            record["train"] = kept
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if audit is not None:
            with (self.run_dir / "audit.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(audit) + "\n")
        self.checkpoint(round_number)  # after the lines: a kill in between is trimmed on resume
        if audit is not None and audit["breaches"] and self.audit and self.audit.stop_on_breach:
            return (
                f"audit threshold breached in round {round_number} (audit.stop_on_breach): "
                + "; ".join(audit["breaches"])
            )
        return None

    def _audit(
        self, scorer: Scorer, round_number: int, tested: EvalResult | None
    ) -> dict[str, Any] | None:
        if self.audit is None:
            return None
        if self.audit.mode == "federated":
            audit, self.pending_audit = self.pending_audit, None
            return audit
        return audit_round(
            scorer,
            self.population.audit_context,
            self.audit,
            self.config.evaluation,
            round_number,
            self.config.seed,
            tested if self.audit.stage == "test" else None,
        )

    def on_evaluate(self, round_number: int, replies: list[Message]) -> MetricRecord | None:
        """The federated audit: add up the clients' audit sums (and ledger their noise)."""
        assert self.audit is not None
        started = time.perf_counter()
        self.pending_audit = None
        ok = [r for r in replies if not r.has_error()]
        parts: list[Sums] = [
            {
                k: cast(float | list[float], v)
                for k, v in r.content["metrics"].items()
                if k.startswith(AUDIT_PREFIX)
            }
            for r in ok
        ]
        if not parts:
            log.warning("round %d: no client returned its audit sums", round_number)
            return None
        if self.audit.exposure_noise > 0:
            for reply in ok:
                metrics = reply.content.metric_records["metrics"]
                partition = self._client_of(reply)
                if partition is not None and int(
                    cast(int, metrics.get("audit-exposure-released", 0))
                ):
                    self.ledger.record(
                        exposure_event(self.fed, self.audit, partition, round_number)
                    )
        rng = np.random.default_rng([self.config.seed, round_number])
        record = audit_from_sums(add_sums(parts), self.population.audit_context, self.audit, rng)
        seconds = time.perf_counter() - started
        self.pending_audit = audit_line(record, self.audit, round_number, seconds, "federated")
        return MetricRecord({"audit-clients": len(parts)})

    def epsilons(self) -> dict[str, float]:
        return epsilons_so_far(self.ledger, self.fed, self.num_clients)

    def history(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def finish(self, stopped: str, failed: bool, started: float) -> dict[str, Any]:
        """``results.json`` (one schema for every engine), the model and the reports."""
        history = self.history()
        evaluated = [h for h in history if "valid" in h]
        monitor = self.config.train.monitor
        best = max(evaluated, key=lambda r: r["valid"][monitor]) if evaluated else None
        # The yardstick a model must beat, on the same split (as fedrec train reports it).
        popularity = evaluate(
            popularity_scorer(self.population.split),
            self.population.split,
            "test",
            self.config.evaluation,
        )
        results = {
            "engine": self.engine,
            "model": self.config.model_name,
            "mode": "federated",
            "clients": self.num_clients,
            "clients_per_round": self.sampled,
            "rounds": history[-1]["round"] if history else self.rounds_done,
            "stopped_early": stopped,
            "failed": failed,
            "final": evaluated[-1] if evaluated else None,
            "best_valid": best,
            "baselines": {"popularity": {"test": popularity.metrics}},
            "wall_seconds": time.perf_counter() - started,
            "config": self.config.to_dict(),
            "environment": environment(),
        }
        write_json_atomic(results, self.run_dir / "results.json")
        self.model.export(self.run_dir)
        disclosures = privacy_disclosures(
            self.fed, self.config.audit, history, self.run_dir / DEVICE_DIR
        )
        write_privacy_report(self.ledger, self.run_dir, disclosures)
        if (self.run_dir / "audit.jsonl").exists():
            write_audit_report(self.run_dir)
        return results


def _tensors(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_tensors(v) for v in value)
    return value


def _numpy(value: Any) -> Any:
    """The inverse of ``_tensors`` (what Flower's strategies and numpy's RNG take back)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_numpy(v) for v in value)
    return value
