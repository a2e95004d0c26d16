"""Flower ClientApp: one client, with only its own data, runs the federation's client round.

A client reads the experiment config (public: the federation's settings), the item catalogue
the server published and its own event store, and nothing else: never the population. A device
(node config ``store`` with ``key-file`` or ``passphrase-env``) keeps all of it in its encrypted
store (``clients.device``); a simulated device reads the node config's ``store``, ``catalogue``
and ``ledger-dir``, else its files in the run folder (``fedrec.federation.layout``). It maps its raw
events through the catalogue (events of items the catalogue lacks are skipped with a warning),
then trains (``fedrec.federation.client.train_round``: budget check, DP-SGD with private noise,
clipping) or evaluates, keeping its privacy ledger and personal prompt in its own files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients import device
from clients.cohort import cohort_mod, roster
from clients.device import reply_message
from clients.secagg import secure_aggregation_mod
from fedrec.audits import AuditContext
from fedrec.config import ExperimentConfig, parse_config
from fedrec.data.catalogue import ItemCatalogue, keep_catalogue
from fedrec.data.split import SequenceSplit
from fedrec.data.store import EventStore, client_split
from fedrec.errors import FedrecDataError
from fedrec.federated_models import build_federated_model
from fedrec.federation.arrays import record_numpy, state_record
from fedrec.federation.client import (
    ClientReply,
    evaluate_round,
    load_ledger,
    over_budget,
    planned_release,
    save_ledger,
    train_round,
    train_shard,
)
from fedrec.federation.cohort import COHORT_SUM, NODE_SUM, NODE_SUM_FACTS, reply_key
from fedrec.federation.layout import client_paths, resolve_config_path, resolve_run_dir
from fedrec.federation.model import FederatedModel, PersonalFile
from fedrec.federation.updates import NodeSum
from fedrec.federation.vectorised import why_not_vectorised
from fedrec.privacy import PrivacyLedger

log = logging.getLogger("fedrec.client")

# A cohort node runs a message for each client it names; training, when it is FedSGD, for all
# of them in one batched computation (resolved at call time: defined below).
app = ClientApp(
    mods=[cohort_mod(train_shard=lambda m, c, clients: train_shard_message(m, c, clients))]
)
torch.set_num_threads(1)  # one CPU per virtual client was fastest on 2 cores (STACK-NOTES)


@dataclass
class Client:
    """What one message needs: the config, the client's own split and files, the model."""

    config: ExperimentConfig
    partition: int
    split: SequenceSplit
    catalogue: ItemCatalogue
    ledger_path: Path
    personal_path: Path
    model: FederatedModel


@functools.lru_cache(maxsize=2)
def _config(path: str, text: str) -> ExperimentConfig:
    """Parsed once per process and content (a sweep may rewrite the same file)."""
    return parse_config(yaml.safe_load(text) or {}, path, text)


@functools.lru_cache(maxsize=2)
def _catalogue(path: Path, version: tuple[int, int]) -> ItemCatalogue:
    return ItemCatalogue.load(path)


def _cached_catalogue(path: Path) -> ItemCatalogue:
    """Loaded (and its hash checked) once per process and file version."""
    stat = path.stat()
    return _catalogue(path, (stat.st_mtime_ns, stat.st_size))


_MODELS: dict[tuple[str, Path, str], FederatedModel] = {}


def _process_model(
    config: ExperimentConfig, config_text: str, run_dir: Path, catalogue: ItemCatalogue
) -> FederatedModel:
    """One model per process and run (the LLM's backbone is loaded once); every message loads
    the global state into it."""
    key = (hashlib.sha256(config_text.encode()).hexdigest(), run_dir, catalogue.content_hash)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_federated_model(config, catalogue, run_dir)
    return _MODELS[key]


def _config_file(path: str) -> tuple[ExperimentConfig, str]:
    """The experiment config of the run, and its text."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the experiment config is missing on this node")
    text = Path(path).read_text(encoding="utf-8")
    return _config(path, text), text


def _experiment(context: Context) -> ExperimentConfig:
    if device.is_device(context.node_config):
        return device.config_of(context)
    return _config_file(resolve_config_path(context.run_config))[0]


def _client_id(context: Context) -> int:
    if device.is_device(context.node_config):
        return device.client_of(context)
    return int(cast(int, context.node_config["partition-id"]))


def _client(context: Context, msg: Message | None = None) -> Client:
    """This node's client; with ``msg`` (a round's message) its model holds the sent global
    state and its catalogue is checked against the one the server runs."""
    config, text = _config_file(resolve_config_path(context.run_config))
    run_dir = resolve_run_dir(context.run_config, config.output_dir)
    store, catalogue_path, ledger, personal = client_paths(run_dir, context.node_config)
    catalogue = _checked_catalogue(catalogue_path, msg)
    data = EventStore(store)
    own = client_split(data.events(), catalogue, data.user_attributes())
    model = _process_model(config, text, run_dir, catalogue)
    if msg is not None:
        model.load_shared_state(msg.content.array_records["arrays"].to_torch_state_dict())
    return Client(
        config,
        int(context.node_config["partition-id"]),
        own.split,
        catalogue,
        ledger,
        personal,
        model,
    )


def _checked_catalogue(path: Path, msg: Message | None) -> ItemCatalogue:
    """The client's catalogue; with ``msg``, checked against the one the server runs."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no item catalogue; the server sends it with its first message to "
            "a node (the identify query): check that the node can write there (node config "
            "`catalogue`)"
        )
    catalogue = _cached_catalogue(path)
    expected = None if msg is None else msg.content.config_records["config"].get("catalogue-hash")
    if expected is not None and expected != catalogue.content_hash:
        raise ValueError(
            f"{path} is catalogue {catalogue.content_hash[:12]}, the server runs "
            f"{str(expected)[:12]}: fetch the server's catalogue.json again"
        )
    return catalogue


def train_shard_message(msg: Message, context: Context, clients: list[int]) -> RecordDict | None:
    """A cohort node's training message for ``clients``, as one batched FedSGD computation
    (``fedrec.federation.client.train_shard``): the records ``cohort_mod`` would have packed
    from each client's own ``train``; None when the federation's local training is not
    FedSGD (``cohort_mod`` then runs ``train`` for each client, and says why once)."""
    config, text = _config_file(resolve_config_path(context.run_config))
    run_dir = resolve_run_dir(context.run_config, config.output_dir)
    catalogue = _checked_catalogue(client_paths(run_dir, context.node_config)[1], msg)
    model = _process_model(config, text, run_dir, catalogue)
    reason = why_not_vectorised(model, config.federated)
    if reason is not None:
        _log_once(f"cohort nodes train client by client: {reason}")
        return None
    packed = RecordDict()
    splits, partitions = [], []
    for client in clients:
        store = client_paths(run_dir, {**context.node_config, "partition-id": client})[0]
        try:
            splits.append(client_split(EventStore(store).events(), catalogue).split)
            partitions.append(client)
        except Exception as err:  # as its own node would: an error reply for this client only
            log.exception("client %d raised", client)
            packed[reply_key("error", client)] = ConfigRecord(
                {"reason": f"{type(err).__name__}: {err}"}
            )
    model.load_shared_state(msg.content.array_records["arrays"].to_torch_state_dict())
    clip = msg.content.config_records["config"].get(KEY_CLIPPING_NORM)
    try:
        replies = train_shard(
            model,
            splits,
            config.federated,
            partitions=partitions,
            round_number=_round(msg),
            seed=config.seed,
            clipping_norm=None if clip is None else float(cast(float, clip)),
        )
    except Exception:  # one batched pass must not fail every client of the node
        log.exception("the batched FedSGD pass failed: this message trains client by client")
        return None
    if replies is None:
        _log_once("cohort nodes train client by client: a client holds several users")
        return None
    sent = msg.content.config_records["config"]
    if sent.get(COHORT_SUM) and clip is not None:
        return _summed(packed, msg, partitions, replies, float(cast(float, clip)))
    for client, reply in zip(partitions, replies, strict=True):
        for name, record in reply_message(msg, reply).content.items():
            packed[reply_key(name, client)] = record
    return packed


def _summed(
    packed: RecordDict,
    msg: Message,
    partitions: list[int],
    replies: list[ClientReply],
    clipping_norm: float,
) -> RecordDict:
    """The node's reply under user-level DP: each client's metrics, and the sum of their
    updates each clipped as the server clips a client's own reply."""
    received = msg.content.array_records["arrays"]
    keys = list(received.keys())
    node_sum = NodeSum(record_numpy(received), clipping_norm)
    for client, reply in zip(partitions, replies, strict=True):
        packed[reply_key("metrics", client)] = MetricRecord(reply.metrics)
        if reply.state is not None:
            node_sum.add([reply.state[k].numpy() for k in keys])
    packed[NODE_SUM] = state_record(dict(zip(keys, node_sum.total, strict=True)))
    packed[NODE_SUM_FACTS] = MetricRecord({"count": node_sum.count})
    return packed


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@app.query("participation")
def participation(msg: Message, context: Context) -> Message:
    """Whether this client takes part in a SecAgg+ round (asked before the protocol fixes its
    cohort): not when its release would pass its ε budget; it says so before it shares a key
    or masks anything."""
    if device.is_device(context.node_config):
        return device.participation(msg, context)
    client = _client(context)
    fed = client.config.federated
    round_number = _round(msg)
    planned = planned_release(client.model, client.split, fed, client.partition, round_number)
    reason = ""
    if over_budget(planned, fed, load_ledger(client.ledger_path)):
        reason = f"client {client.partition} would pass record_epsilon_budget"
    answer = ConfigRecord({"joins": not reason, "reason": reason})
    return Message(RecordDict({"config": answer}), reply_to=msg)


def _round(msg: Message) -> int:
    return int(cast(int, msg.content.config_records["config"]["server-round"]))


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which client this node runs (the server samples clients, not Flower's node IDs); the
    query brings the run's item catalogue, kept when this client's copy is another."""
    if device.is_device(context.node_config):
        return device.identify(msg, context)
    _keep_published(msg.content.config_records["config"], context)
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _keep_published(sent: ConfigRecord, context: Context) -> None:
    """Keep the catalogue the server published, unless this node holds that one already."""
    published = str(sent.get("catalogue", ""))
    if not published:
        return
    config, _ = _config_file(resolve_config_path(context.run_config))
    run_dir = resolve_run_dir(context.run_config, config.output_dir)
    _, path, _, _ = client_paths(run_dir, context.node_config)
    try:
        held = _cached_catalogue(path).content_hash if path.exists() else None
    except FedrecDataError:
        held = None  # a damaged copy: replaced by the verified one
    if held is None or held != sent.get("catalogue-hash"):
        keep_catalogue(published, path)


@app.query("cohort")
def cohort_roster(msg: Message, context: Context) -> Message:
    """Which clients this node hosts, with cohort nodes (``federated.users_per_node``); the
    query brings the run's catalogue, as the identify query does to a node of one client."""
    published = msg.content.config_records.get("published")
    if published is not None:
        _keep_published(published, context)
    return roster(msg, context)


@app.query("bundle")
def bundle(msg: Message, context: Context) -> Message:
    """The run's final model bundle: a device keeps it; a simulated one has no use for it."""
    if device.is_device(context.node_config):
        return device.bundle(msg, context)
    return Message(RecordDict({"metrics": MetricRecord({"kept": 0})}), reply_to=msg)


@app.train(mods=[secure_aggregation_mod(_experiment, _client_id)])
def train(msg: Message, context: Context) -> Message:
    if device.is_device(context.node_config):
        return device.train(msg, context)
    client = _client(context, msg)
    config = client.config
    clip = msg.content.config_records["config"].get(KEY_CLIPPING_NORM)
    with _own_ledger(client.ledger_path) as ledger:
        reply = train_round(
            client.model,
            client.split,
            config.federated,
            partition=client.partition,
            round_number=_round(msg),
            seed=config.seed,
            ledger=ledger,
            personal=PersonalFile(client.personal_path),
            clipping_norm=None if clip is None else float(cast(float, clip)),
        )
    return reply_message(msg, reply)


@app.evaluate()
def evaluate_on_device(msg: Message, context: Context) -> Message:
    """Metrics on this client's own held-out (test) items; under the federated audit also its
    audit sums (group statistics, its top-K exposure, optionally noised and ledgered)."""
    if device.is_device(context.node_config):
        return device.evaluate(msg, context)
    client = _client(context, msg)
    config, audit = client.config, client.config.audit
    federated_audit = audit.enabled and audit.mode == "federated"
    context_ = None
    if federated_audit:
        catalogue = client.catalogue
        if catalogue.popularity is None:
            raise ValueError(
                "the catalogue has no item popularity, which the federated audit needs: the "
                "server's config must set audit.mode: federated"
            )
        context_ = AuditContext.from_parts(
            client.split,
            audit,
            client.split.user_features,
            np.asarray(catalogue.popularity, dtype=np.int64),
            _column(catalogue, "genres"),
        )
    with _own_ledger(client.ledger_path) as ledger:
        reply = evaluate_round(
            client.model,
            client.split,
            config.federated,
            partition=client.partition,
            round_number=_round(msg),
            seed=config.seed,
            ledger=ledger,
            audit=audit if federated_audit else None,
            audit_context=context_,
            evaluation=config.evaluation,
        )
    return reply_message(msg, reply)


@contextlib.contextmanager
def _own_ledger(path: Path) -> Iterator[PrivacyLedger]:
    """The client's ledger, saved when the block recorded a release in it."""
    ledger = load_ledger(path)
    before = len(ledger.events)
    yield ledger
    if len(ledger.events) != before:
        save_ledger(ledger, path)


def _column(catalogue: ItemCatalogue, name: str) -> np.ndarray | None:
    values = catalogue.item_features.get(name)
    return None if values is None else np.array(values, dtype=object)
