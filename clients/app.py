"""Flower ClientApp: one client trains and evaluates on its own partition, and nothing else.

A client loads the population's config, takes only its partition (by ``partition-id``),
trains locally (with Opacus DP-SGD when ``federated.record_dp`` is set) and replies with the
model's shared arrays (the whole sequential model, or only the LLM recommender's adapters),
``num-examples`` and metrics, including the DP parameters it spent this round. It keeps its
own privacy ledger on disk (``client_ledger_path``), so ε survives restarts, and refuses to
train, saying so in its reply, when the next round would take it past
``federated.record_epsilon_budget``. An LLM client keeps its personal prompt next to its
ledger (``client_personal_path``) and never sends it; its backbone is loaded once per process.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedrec.audits.federated import PREFIX as AUDIT_PREFIX
from fedrec.audits.federated import client_sums
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.federation import (
    FederatedModel,
    Population,
    build_federated_model,
    client_ledger_path,
    client_personal_path,
    client_seed,
    exposure_event,
    load_population,
    noise_seed,
    planned_record_event,
    reply_weight,
    resolve_config_path,
    resolve_run_dir,
)
from fedrec.privacy import PrivacyBudget, PrivacyEvent, PrivacyLedger
from fedrec.privacy.randomness import numpy_generator

if TYPE_CHECKING:
    from fedrec.config import ExperimentConfig

MetricValue = int | float | list[int] | list[float]
LEGACY_LEDGER_DIR = "client-ledgers"  # where simulated devices kept ledgers before devices/
CLIPPING_NORM_KEY = "clipping_norm"
DP_METRICS = (
    "dp-noise-multiplier",
    "dp-sample-rate",
    "dp-steps",
    "dp-clip-norm",
    "dp-delta",
)  # what Flower's client-side DP wrapper puts in the config


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, applied when the server runs DP-FedAvg (it then sends a
    clipping norm); a federation without central DP passes straight through."""
    if CLIPPING_NORM_KEY not in msg.content.config_records["config"]:
        return call_next(msg, context)
    replies: list[Message] = []

    def train_once(message: Message, ctx: Context) -> Message:
        replies.append(call_next(message, ctx))
        return replies[-1]

    try:
        return fixedclipping_mod(msg, context, train_once)
    except ZeroDivisionError:
        # Flower's clip divides by the update's norm, so an exactly-zero update (a client that
        # refused or had nothing to train on) crashes it. Zero is within any clip norm, and the
        # mod only replaces the arrays after clipping, so the reply is already correct.
        if not replies:
            raise
        return replies[-1]


app = ClientApp()
torch.set_num_threads(1)  # one CPU per virtual client was fastest on 2 cores (STACK-NOTES)


def _setup(msg: Message, context: Context) -> tuple[Population, int, FederatedModel]:
    population = load_population(resolve_config_path(context.run_config))
    run_dir = resolve_run_dir(context.run_config, population.config.output_dir)
    model = build_federated_model(population, run_dir, cached=True)
    model.load_shared_state(msg.content.array_records["arrays"].to_torch_state_dict())
    return population, int(context.node_config["partition-id"]), model


def _ledger_path(context: Context, population: Population) -> Path:
    return client_ledger_path(context.run_config, context.node_config, population.config.output_dir)


def _ledger(path: Path) -> PrivacyLedger:
    """The device's ledger (it outlives runs: never reset here). A simulated device of a run
    started before ledgers moved to ``devices/`` reads its old file; the next save moves it."""
    ledger = PrivacyLedger()
    legacy = path.parent.parent / LEGACY_LEDGER_DIR / path.name
    source = path if path.exists() or not legacy.exists() else legacy
    if source.exists():
        ledger.load_state_dict(json.loads(source.read_text(encoding="utf-8")))
    return ledger


def _save_ledger(ledger: PrivacyLedger, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger.state_dict()), encoding="utf-8")
    os.replace(tmp, path)


def _spent_metrics(spent: PrivacyEvent | None) -> dict[str, MetricValue]:
    if spent is None:
        return {key: 0 if key == "dp-steps" else 0.0 for key in DP_METRICS}
    return {
        "dp-noise-multiplier": spent.noise_multiplier,
        "dp-sample-rate": spent.sample_rate,
        "dp-steps": spent.steps,
        "dp-clip-norm": spent.clip_norm,
        "dp-delta": spent.delta,
    }


@app.train(mods=[central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    population, partition, model = _setup(msg, context)
    config, fed = population.config, population.config.federated
    sent = msg.content.config_records["config"]
    round_ = int(cast(int, sent["server-round"])) + int(cast(int, sent.get("round-offset", 0)))
    ledger_path = _ledger_path(context, population)
    ledger = _ledger(ledger_path)
    split = population.client_split(partition)
    records = model.record_count(split, fed) if fed.record_dp is not None else 0
    planned = planned_record_event(fed, records, partition, round_)
    metrics: dict[str, MetricValue] = {"partition-id": partition, "refused": 0}
    if fed.record_dp is not None:
        # Flower aggregates only MetricRecords with identical keys, so every reply of a DP
        # federation carries the DP keys; dp-steps 0 means nothing was released.
        metrics.update(_spent_metrics(None))
    if planned is not None and fed.record_epsilon_budget is not None:
        budget = PrivacyBudget(fed.record_epsilon_budget, planned.delta)
        if not budget.allows(ledger, planned):
            metrics.update({"refused": 1, "num-examples": 0})
            if fed.report_train_loss:
                metrics["train-loss"] = 0.0
            return Message(
                RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(metrics)}),
                reply_to=msg,
            )
    result = model.train_local(
        split,
        fed,
        client_seed(config.seed, round_, partition),
        client_personal_path(context.run_config, context.node_config, config.output_dir),
        noise_seed(fed, config.seed, round_, partition),
    )
    metrics["num-examples"] = reply_weight(result, fed)
    if fed.report_train_loss:
        metrics["train-loss"] = result.loss
    if result.dp is not None and planned is not None:
        spent = dataclasses.replace(planned, steps=result.dp.steps)
        ledger.record(spent)
        _save_ledger(ledger, ledger_path)
        metrics.update(_spent_metrics(spent))
    reply = RecordDict(
        {"arrays": ArrayRecord(model.shared_state()), "metrics": MetricRecord(metrics)}
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_on_device(msg: Message, context: Context) -> Message:
    """Full-ranking metrics on this client's own held-out (test) items; under the federated
    audit also its audit sums (group statistics, its top-K exposure, optionally noised)."""
    population, partition, model = _setup(msg, context)
    split = population.client_split(partition)
    config = population.config
    scorer = model.scorer(split, torch.device("cpu"))
    audit = config.audit
    if not (audit.enabled and audit.mode == "federated"):
        result = evaluate(scorer, split, "test", EvalConfig(ks=(10, 20)))
        metrics = _mean_metrics(result.metrics)
        metrics["num-examples"] = split.num_users
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    audit_context = population.client_audit_context(partition)
    result = audit_context.evaluate(scorer, audit, config.evaluation)
    assert result.top_items is not None
    metrics = _mean_metrics(result.metrics)
    sent = msg.content.config_records["config"]
    round_ = int(cast(int, sent["server-round"])) + int(cast(int, sent.get("round-offset", 0)))
    released = _may_release_exposure(context, population, partition, round_)
    sums = client_sums(
        result.per_user,
        result.top_items,
        audit_context,
        audit,
        numpy_generator(_noise_seed_of(config, round_, partition)),
    )
    if not released:  # over budget: the histogram is withheld, the server is told
        sums[f"{AUDIT_PREFIX}exposure"] = [0.0] * split.num_items
    metrics.update(
        {
            **sums,
            "partition-id": partition,
            "num-examples": split.num_users,
            "audit-exposure-released": int(released),
        }
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _noise_seed_of(config: ExperimentConfig, round_: int, partition: int) -> int | None:
    seed = noise_seed(config.federated, config.seed, round_, partition)
    return None if seed is None else seed + 1  # not the training noise's stream


def _may_release_exposure(
    context: Context, population: Population, partition: int, round_: int
) -> bool:
    """Whether this client's noised exposure histogram fits its budget; if it does, the release
    is recorded in its own ledger (the same budget as its training) before it is sent."""
    config = population.config
    if config.audit.exposure_noise <= 0:
        return True  # un-noised: outside the ledger, and the report says so
    event = exposure_event(config, partition, round_)
    ledger_path = _ledger_path(context, population)
    ledger = _ledger(ledger_path)
    budget = config.federated.record_epsilon_budget
    if budget is not None and not PrivacyBudget(budget, event.delta).allows(ledger, event):
        return False
    ledger.record(event)
    _save_ledger(ledger, ledger_path)
    return True


def _mean_metrics(metrics: dict[str, float]) -> dict[str, MetricValue]:
    return {
        name: float(value) for name, value in metrics.items() if not name.startswith("Coverage")
    }
