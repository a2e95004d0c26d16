"""Flower ServerApp: holds the global model, runs the strategy, evaluates, accounts the privacy
spend, audits bias and fairness and checkpoints after every round.

Per round it appends one line to ``metrics.jsonl`` (validation and test metrics of the global
model, client counts, ε so far) and one to ``audit.jsonl`` (group gaps, exposure, calibration,
threshold breaches), and rewrites ``checkpoint.pt`` atomically with the model, the privacy
ledger and the round, so ``resume`` continues all of them. At the end it writes
``results.json``, the privacy report and the audit report.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedrec.audits import audit_line, audit_round
from fedrec.audits.federated import PREFIX as AUDIT_PREFIX
from fedrec.audits.federated import Sums, add_sums, audit_from_sums
from fedrec.audits.report import write_audit_report
from fedrec.evaluation import EvalResult, evaluate
from fedrec.evaluation.evaluator import Scorer
from fedrec.experiment import environment, write_json_atomic
from fedrec.federation import (
    CLIENT_STATE_DIR,
    DEVICE_DIR,
    Population,
    build_federated_model,
    central_event,
    epsilon_text,
    epsilons_so_far,
    exposure_event,
    load_population,
    privacy_disclosures,
    resolve_config_path,
    resolve_run_dir,
)
from fedrec.privacy import PrivacyEvent, PrivacyLedger
from fedrec.privacy.report import write_privacy_report
from fedrec.training import resolve_device, save_atomic, seed_everything
from server.strategy import (
    ClientsFailed,
    LedgerKeeper,
    StopFederation,
    build_strategy,
    load_strategy_state,
    strategy_state,
)

log = logging.getLogger("fedrec.server")
LOGS = ("metrics.jsonl", "audit.jsonl")  # one line per round each, trimmed on resume
app = ServerApp()


class Federation:
    """The server's state across rounds: global model, ledger, metrics and checkpoints."""

    def __init__(self, population: Population, run_dir: Path, resume: bool, strategy: Strategy):
        self.population = population
        self.config = population.config
        self.fed = self.config.federated
        self.run_dir = run_dir
        self.device = resolve_device(self.config.train.device)
        seed_everything(self.config.seed)
        if self.config.llm is not None:
            from fedrec.llm_rec.federated import ensure_foundation

            ensure_foundation(population, run_dir)  # the foundation stage, before any round
        self.model = build_federated_model(population, run_dir).to(self.device)
        self.ledger = PrivacyLedger()
        self.rounds_done = 0
        self.num_clients = len(population.partitions)
        self.sampled = self.fed.sampled_clients(self.num_clients)
        self.strategy = strategy
        self.audit = self.config.audit if self.config.audit.enabled else None
        self.pending_audit: dict[str, Any] | None = None  # the federated audit of this round
        checkpoint = run_dir / "checkpoint.pt"
        if resume and checkpoint.exists():
            self._restore(torch.load(checkpoint, weights_only=False))
            log.info("resumed from %s at round %d", checkpoint, self.rounds_done)
        elif not resume:
            for log_file in LOGS:
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
        self.round_started = time.perf_counter()

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_shared_state(state["model"])
        self.ledger.load_state_dict(state["ledger"])
        self.rounds_done = int(state["round"])
        load_strategy_state(self.strategy, state["strategy"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        # A kill between a log line and the checkpoint leaves a line for a round that will
        # run again: keep only the rounds the checkpoint holds.
        for log_file in LOGS:
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
                "strategy": strategy_state(self.strategy),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                },
                "config": self.config.to_dict(),
            },
            self.run_dir / "checkpoint.pt",
        )

    def global_round(self, server_round: int) -> int:
        return self.rounds_done + server_round

    def may_start(self, server_round: int) -> bool:
        central = self.fed.central_dp
        self.round_started = time.perf_counter()
        if central is None or central.target_epsilon is None:
            return True
        next_event = central_event(self.fed, self.num_clients, self.global_round(server_round))
        delta = central.delta_for(self.num_clients)
        return self.ledger.epsilon("server", delta, extra=next_event) <= central.target_epsilon

    def on_replies(self, server_round: int, replies: list[Message]) -> None:
        ok = [r for r in replies if not r.has_error()]
        if replies and not ok:  # (a Poisson round may sample nobody: still a noised release)
            raise ClientsFailed(
                f"round {self.global_round(server_round)}: none of the {len(replies)} sampled "
                "clients replied without an error (their tracebacks are in the log above); the "
                "checkpoint holds the last complete round, fix the cause and rerun with --resume"
            )
        self.last_replies = len(ok)
        self.last_refused = 0
        for reply in ok:
            metrics = reply.content.metric_records["metrics"]
            self.last_refused += int(cast(int, metrics.get("refused", 0)))
            if int(cast(int, metrics.get("dp-steps", 0))) > 0:
                self.ledger.record(
                    PrivacyEvent(
                        round=self.global_round(server_round),
                        party=f"client:{int(cast(int, metrics['partition-id']))}",
                        mechanism="dp-sgd",
                        unit=self.fed.protected_unit,
                        noise_multiplier=float(cast(float, metrics["dp-noise-multiplier"])),
                        sample_rate=float(cast(float, metrics["dp-sample-rate"])),
                        steps=int(cast(int, metrics["dp-steps"])),
                        clip_norm=float(cast(float, metrics["dp-clip-norm"])),
                        delta=float(cast(float, metrics["dp-delta"])),
                        accountant=self.fed.record_dp.accountant if self.fed.record_dp else "rdp",
                    )
                )
        if self.fed.central_dp is not None:
            # The noise is on the sum and the divisor is public, so replies that are missing
            # do not change σ: every round is the same release.
            self.ledger.record(
                central_event(self.fed, self.num_clients, self.global_round(server_round))
            )

    def evaluated(self, server_round: int) -> bool:
        """Whether this round's global model is evaluated (``federated.eval_every``)."""
        every, round_number = self.fed.eval_every, self.global_round(server_round)
        if server_round == 0:
            return every == 1
        return round_number % every == 0 or round_number >= self.fed.num_rounds

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        train_seconds = time.perf_counter() - self.round_started  # sampling to aggregation
        self.model.load_shared_state(arrays.to_torch_state_dict())
        if not self.evaluated(server_round):
            if server_round > 0:  # round 0 is the initial model: nothing trained, nothing logged
                facts = self._round_facts(train_seconds)
                self._log_round(
                    server_round, {"round": self.global_round(server_round), **facts}, None
                )
            return None
        split, evaluation = self.population.split, self.config.evaluation
        scorer = self.model.scorer(split, self.device)
        valid = evaluate(scorer, split, "valid", evaluation).metrics
        audited = self.audit is not None and self.audit.mode == "server" and server_round > 0
        tested = evaluate(
            scorer, split, "test", evaluation, top_n=self.audit.k if self.audit and audited else 0
        )
        test = tested.metrics
        round_number = self.global_round(server_round)
        record: dict[str, Any] = {"round": round_number, "valid": valid, "test": test}
        if server_round > 0:
            audit = self._audit(scorer, round_number, tested if audited else None)
            record.update(self._round_facts(train_seconds))
            self._log_round(server_round, record, audit)
        monitor = self.config.train.monitor
        log.info(
            "round %d: valid %s %.4f  test %s %.4f  clients %s%s",
            round_number,
            monitor,
            valid[monitor],
            monitor,
            test[monitor],
            record.get("clients", "-"),
            epsilon_text(record.get("epsilon", {})),
        )
        return MetricRecord({f"valid-{monitor}": valid[monitor], f"test-{monitor}": test[monitor]})

    def _round_facts(self, train_seconds: float) -> dict[str, Any]:
        return {
            "clients": getattr(self, "last_replies", 0),
            "refused": getattr(self, "last_refused", 0),
            "seconds": train_seconds,
            "epsilon": self.epsilons(),
        }

    def _log_round(
        self, server_round: int, record: dict[str, Any], audit: dict[str, Any] | None
    ) -> None:
        """Append the round's lines, then checkpoint (a kill in between is trimmed on resume)."""
        round_number = self.global_round(server_round)
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if audit is not None:
            with (self.run_dir / "audit.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(audit) + "\n")
        self.checkpoint(round_number)
        if audit is not None and audit["breaches"] and self.audit and self.audit.stop_on_breach:
            raise StopFederation(
                f"audit threshold breached in round {round_number} (audit.stop_on_breach): "
                + "; ".join(audit["breaches"])
            )

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

    def on_evaluate(self, server_round: int, replies: list[Message]) -> MetricRecord | None:
        """The federated audit: add up the clients' audit sums (and ledger their noise)."""
        assert self.audit is not None
        started = time.perf_counter()
        parts: list[Sums] = [
            {
                k: cast(float | list[float], v)
                for k, v in r.content["metrics"].items()
                if k.startswith(AUDIT_PREFIX)
            }
            for r in replies
            if not r.has_error()
        ]
        if not parts:
            log.warning("round %d: no client returned its audit sums", server_round)
            return None
        round_number = self.global_round(server_round)
        if self.audit.exposure_noise > 0:
            for reply in (r for r in replies if not r.has_error()):
                metrics = reply.content.metric_records["metrics"]
                if int(cast(int, metrics.get("audit-exposure-released", 0))):
                    partition = int(cast(int, metrics["partition-id"]))
                    self.ledger.record(
                        exposure_event(self.population.config, partition, round_number)
                    )
        rng = np.random.default_rng([self.config.seed, round_number])
        record = audit_from_sums(add_sums(parts), self.population.audit_context, self.audit, rng)
        seconds = time.perf_counter() - started
        self.pending_audit = audit_line(record, self.audit, round_number, seconds, "federated")
        return MetricRecord({"audit-clients": len(parts)})

    def epsilons(self) -> dict[str, float]:
        return epsilons_so_far(self.ledger, self.fed, self.num_clients)


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    population = load_population(resolve_config_path(context.run_config))
    config, fed = population.config, population.config.federated
    run_dir = resolve_run_dir(context.run_config, config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(context.run_config.get("resume", False)) or os.environ.get("FEDREC_RESUME") == "1"
    client_audit = config.audit.enabled and config.audit.mode == "federated"
    inner = build_strategy(fed, len(population.partitions), config.seed, client_audit)
    federation = Federation(population, run_dir, resume, inner)
    rounds = fed.num_rounds - federation.rounds_done
    strategy = LedgerKeeper(
        inner,
        federation.on_replies,
        federation.may_start,
        federation.on_evaluate if client_audit else None,
    )
    stopped, failed = "", False
    if rounds > 0:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(federation.model.shared_state()),
                num_rounds=rounds,
                timeout=fed.round_timeout,
                # Flower numbers the rounds of this start from 1; clients label their ledger
                # events with the global round, so a resumed run sends the offset.
                train_config=ConfigRecord(
                    {"local-epochs": fed.local_epochs, "round-offset": federation.rounds_done}
                ),
                evaluate_config=ConfigRecord({"round-offset": federation.rounds_done}),
                evaluate_fn=federation.evaluate_round,
            )
        except StopFederation as reason:
            stopped, failed = str(reason), isinstance(reason, ClientsFailed)
            (log.error if failed else log.warning)("stopping: %s", reason)
    lines = (
        (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if (run_dir / "metrics.jsonl").exists()
        else []
    )
    history = [json.loads(line) for line in lines]
    evaluated = [h for h in history if "valid" in h]
    results = {
        "model": config.model_name,
        "mode": "federated",
        "clients": federation.num_clients,
        "clients_per_round": federation.sampled,
        "rounds": history[-1]["round"] if history else federation.rounds_done,
        "stopped_early": stopped,
        "failed": failed,
        "final": evaluated[-1] if evaluated else None,
        "best_valid_round": max(evaluated, key=lambda r: r["valid"][config.train.monitor])["round"]
        if evaluated
        else None,
        "wall_seconds": time.perf_counter() - started,
        "config": config.to_dict(),
        "environment": environment(),
    }
    write_json_atomic(results, run_dir / "results.json")
    federation.model.export(run_dir)
    write_privacy_report(federation.ledger, run_dir, privacy_disclosures(config, history, run_dir))
    if (run_dir / "audit.jsonl").exists():
        write_audit_report(run_dir)
