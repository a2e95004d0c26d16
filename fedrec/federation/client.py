"""One client round, without Flower: what a client does with the global model it is sent.

Training: budget check → local training (private randomness) → clipping → reply with DP
metadata. Evaluation: full-ranking metrics on its own held-out items, or under the federated
audit its audit sums (with its noised exposure histogram, ledgered before it is sent). The
Flower ClientApp (``clients.app``) and, through it, the in-process loop call these; the device
SDK will too. The client's data is only what it is given: its own split and audit context.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedrec.audits import AuditConfig, AuditContext
from fedrec.audits.federated import PREFIX as AUDIT_PREFIX
from fedrec.audits.federated import client_sums
from fedrec.data.split import SequenceSplit
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.federation.config import FederatedConfig
from fedrec.federation.layout import LEGACY_LEDGER_DIR
from fedrec.federation.model import (
    FederatedModel,
    LocalResult,
    PersonalParameters,
)
from fedrec.federation.privacy import (
    client_seed,
    event_metrics,
    exposure_event,
    noise_seed,
    planned_record_event,
)
from fedrec.federation.updates import NORM_BIT, l2_norm
from fedrec.federation.vectorised import batched_fedsgd_steps, why_not_vectorised
from fedrec.privacy import PrivacyBudget, PrivacyEvent, PrivacyLedger
from fedrec.privacy.randomness import numpy_generator

MetricValue = int | float | list[int] | list[float]
DEVICE_EVAL = EvalConfig(ks=(10, 20))  # what a client reports without the federated audit


@dataclass
class ClientReply:
    """A round's reply: ``state`` is what crosses the network (the model's shared tensors;
    training only), ``metrics`` the numbers sent with it."""

    metrics: dict[str, MetricValue]
    state: dict[str, torch.Tensor] | None = None


def load_ledger(path: Path) -> PrivacyLedger:
    """A client's ledger (it outlives runs: never reset here). A simulated device of a run
    started before ledgers moved to ``devices/`` reads its old file; the next save writes the
    new one (the old file is left as it was)."""
    ledger = PrivacyLedger()
    legacy = path.parent.parent / LEGACY_LEDGER_DIR / path.name
    source = path if path.exists() or not legacy.exists() else legacy
    if source.exists():
        ledger.load_state_dict(json.loads(source.read_text(encoding="utf-8")))
    return ledger


def save_ledger(ledger: PrivacyLedger, path: Path) -> None:
    """Atomically, readable by the device's owner only (it describes the user's data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger.state_dict()), encoding="utf-8")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def reply_weight(result: LocalResult, fed: FederatedConfig) -> int:
    """``num-examples`` a client reports: its training positions when the federation weights by
    examples, else 1 (any DP run by default: the count is the client's data, un-noised, and
    DP-FedAvg's noise is calibrated to an unweighted sum); 0 when it did not train."""
    if result.num_examples == 0:
        return 0
    return result.num_examples if fed.weighted else 1


def clip_update(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clipping_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """(``state`` moved towards ``reference`` until ``state - reference`` has L2 norm at most
    ``clipping_norm``, Flower's client-side clipping; the norm before). A zero update, which
    would make Flower's clip divide by zero, is within any norm."""
    new = [t.detach().cpu().numpy().copy() for t in state.values()]
    old = [reference[k].detach().cpu().numpy() for k in state]
    norm = l2_norm([np.subtract(n, o, dtype=np.float64) for n, o in zip(new, old, strict=True)])
    if norm == 0:
        return state, 0.0
    compute_clip_model_update(new, old, clipping_norm)
    return {k: torch.from_numpy(v) for k, v in zip(state, new, strict=True)}, norm


def planned_release(
    model: FederatedModel, split: SequenceSplit, fed: FederatedConfig, partition: int, round_: int
) -> PrivacyEvent | None:
    """The record-level DP release this client would make by training this round."""
    records = model.record_count(split, fed) if fed.record_dp is not None else 0
    return planned_record_event(fed, records, partition, round_)


def over_budget(planned: PrivacyEvent | None, fed: FederatedConfig, ledger: PrivacyLedger) -> bool:
    """Whether ``planned`` would take the client past ``record_epsilon_budget``."""
    budget = fed.record_epsilon_budget
    return (
        planned is not None
        and budget is not None
        and not PrivacyBudget(budget, planned.delta).allows(ledger, planned)
    )


def _reply_metrics(fed: FederatedConfig, partition: int) -> dict[str, MetricValue]:
    metrics: dict[str, MetricValue] = {"partition-id": partition, "refused": 0}
    if fed.record_dp is not None:
        # Flower aggregates only MetricRecords with identical keys, so every reply of a DP
        # federation carries the DP keys; dp-steps 0 means nothing was released.
        metrics.update(event_metrics(None))
    return metrics


def declined_reply(
    fed: FederatedConfig,
    partition: int,
    global_state: dict[str, torch.Tensor],
    clipping_norm: float | None = None,
) -> ClientReply:
    """A training reply that releases nothing: the global state back, ``refused`` 1."""
    metrics = _reply_metrics(fed, partition)
    metrics.update({"refused": 1, "num-examples": 0})
    if clipping_norm is not None:
        metrics[NORM_BIT] = 1  # a zero update is within any norm
    if fed.report_train_loss:
        metrics["train-loss"] = 0.0
    return ClientReply(metrics, global_state)


def train_round(
    model: FederatedModel,
    split: SequenceSplit,
    fed: FederatedConfig,
    *,
    partition: int,
    round_number: int,
    seed: int,
    ledger: PrivacyLedger,
    personal: PersonalParameters | None,
    clipping_norm: float | None,
) -> ClientReply:
    """Train ``model`` (holding the global state) on ``split``; records the DP release in
    ``ledger`` (the caller saves it). A client whose next release would pass
    ``record_epsilon_budget`` refuses: it replies with the global state and ``refused`` 1."""
    global_state = {k: v.detach().clone() for k, v in model.shared_state().items()}
    planned = planned_release(model, split, fed, partition, round_number)
    if over_budget(planned, fed, ledger):
        return declined_reply(fed, partition, global_state, clipping_norm)
    result = model.train_local(
        split,
        fed,
        client_seed(seed, round_number, partition),
        personal,
        noise_seed(fed, seed, round_number, partition),
    )
    if result.dp is not None and planned is not None:
        planned = dataclasses.replace(planned, steps=result.dp.steps)
        ledger.record(planned)
    return _trained_reply(
        fed, partition, result, planned, model.shared_state(), global_state, clipping_norm
    )


def _trained_reply(
    fed: FederatedConfig,
    partition: int,
    result: LocalResult,
    spent: PrivacyEvent | None,
    state: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    clipping_norm: float | None,
) -> ClientReply:
    metrics = _reply_metrics(fed, partition)
    metrics["num-examples"] = reply_weight(result, fed)
    if fed.report_train_loss:
        metrics["train-loss"] = result.loss
    if result.dp is not None and spent is not None:
        metrics.update(event_metrics(spent))
    if clipping_norm is not None:
        state, norm = clip_update(state, global_state, clipping_norm)
        # Adaptive clipping's bit (Andrew et al. 2021): was the update within C before the
        # clip? The server sees only clipped updates; its count of these bits is noised.
        metrics[NORM_BIT] = int(norm <= clipping_norm)
    return ClientReply(metrics, state)


def train_shard(
    model: FederatedModel,
    splits: Sequence[SequenceSplit],
    fed: FederatedConfig,
    *,
    partitions: Sequence[int],
    round_number: int,
    seed: int,
    clipping_norm: float | None,
) -> list[ClientReply] | None:
    """``train_round`` of every client of a shard (``partitions[i]`` holding ``splits[i]``) in
    one batched FedSGD computation (``fedrec.federation.vectorised``), the same replies; None
    when these clients cannot train that way (the caller runs ``train_round`` for each). No
    ledger: FedSGD without record-level DP releases nothing on the client."""
    if why_not_vectorised(model, fed) is not None:
        return None
    global_state = {k: v.detach().clone() for k, v in model.shared_state().items()}
    trained = batched_fedsgd_steps(
        model, splits, fed, [client_seed(seed, round_number, p) for p in partitions]
    )
    if trained is None:
        return None
    return [
        _trained_reply(fed, partition, result, None, state, global_state, clipping_norm)
        for partition, (state, result) in zip(partitions, trained, strict=True)
    ]


def evaluate_round(
    model: FederatedModel,
    split: SequenceSplit,
    fed: FederatedConfig,
    *,
    partition: int,
    round_number: int,
    seed: int,
    ledger: PrivacyLedger,
    audit: AuditConfig | None = None,
    audit_context: AuditContext | None = None,
    evaluation: EvalConfig = DEVICE_EVAL,
) -> ClientReply:
    """Metrics of the global model on this client's test items; with ``audit`` (the federated
    audit) also its audit sums. Its exposure histogram, noised, is a release: recorded in
    ``ledger`` when it fits the client's budget, else withheld (zeros) and the server told."""
    scorer = model.scorer(split, torch.device("cpu"))
    if audit is None:
        result = evaluate(scorer, split, "test", DEVICE_EVAL)
        metrics = _scalar_metrics(result.metrics)
        metrics["num-examples"] = split.num_users
        return ClientReply(metrics)
    assert audit_context is not None
    result = audit_context.evaluate(scorer, audit, evaluation)
    metrics = _scalar_metrics(result.metrics)
    released = _may_release_exposure(fed, audit, ledger, partition, round_number)
    rng = numpy_generator(noise_seed(fed, seed, round_number, partition, stream=2))
    sums = client_sums(result.per_user, result.top_items, audit_context, audit, rng)
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
    return ClientReply(metrics)


def _may_release_exposure(
    fed: FederatedConfig, audit: AuditConfig, ledger: PrivacyLedger, partition: int, round_: int
) -> bool:
    if audit.exposure_noise <= 0:
        return True  # un-noised: outside the ledger, and the report says so
    event = exposure_event(fed, audit, partition, round_)
    budget = fed.record_epsilon_budget
    if budget is not None and not PrivacyBudget(budget, event.delta).allows(ledger, event):
        return False
    ledger.record(event)
    return True


def _scalar_metrics(metrics: dict[str, float]) -> dict[str, MetricValue]:
    return {
        name: float(value) for name, value in metrics.items() if not name.startswith("Coverage")
    }
