"""The ClientApp's messages on a device: a SuperNode whose node config names an encrypted store
(``store`` with ``key-file`` or ``passphrase-env``; ``fedrec device join`` writes them).

Everything is read from and kept in that store through ``fedrec.device.DeviceClient``: the
server's config and catalogue (sent with the first query, with the client this device's
authenticated key is enrolled as), the events, the ledger and the latest model bundle. The
node reads no other file of the run but, for the LLM recommender, its public foundation folder
(node config ``foundation``), or for a ranker federation its retrieval bundle there, checked
against the digest the bundle names. Node config ``min-events``, ``epsilon-budget``,
``only-when`` (a command that exits 0 when the device may train, e.g. ``on_ac_power``) and
``allow-without-dp`` (train when the federation sets no record-level DP) make its participation
policy.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

import fedrec.device
from fedrec.config import ExperimentConfig
from fedrec.device import DeviceClient, ParticipationPolicy, key_from_passphrase
from fedrec.federation.arrays import state_record
from fedrec.federation.client import ClientReply
from fedrec.federation.layout import own_folders

STORE_WAIT = 60.0  # seconds a message waits for the app (or another message) to close the store
KEY_FILE, PASSPHRASE_ENV = "key-file", "passphrase-env"


def is_device(node_config: Mapping[str, Any]) -> bool:
    return KEY_FILE in node_config or PASSPHRASE_ENV in node_config


def store_key(node_config: Mapping[str, Any]) -> bytes:
    """The store's key: a 32-byte key file readable by its owner only, or a passphrase in the
    environment variable ``passphrase-env`` names (scrypt with the store's salt)."""
    folder = Path(str(node_config["store"]))
    if KEY_FILE in node_config:
        path = Path(str(node_config[KEY_FILE]))
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"{path}: a store key must be readable by its owner only (chmod 600)"
            )
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path}: a store key is 32 bytes, this file has {len(key)}")
        return key
    variable = str(node_config[PASSPHRASE_ENV])
    passphrase = os.environ.get(variable)
    if not passphrase:
        raise ValueError(f"${variable} (node config {PASSPHRASE_ENV}) holds no passphrase")
    return key_from_passphrase(passphrase, folder)


def open_device(node_config: Mapping[str, Any], run_dir: str = "") -> DeviceClient:
    """The device's client; ``run_dir`` (the run config's, when it names one) is the server's
    folder, which the store must not be in."""
    if run_dir:
        own_folders(Path(run_dir), node_config, ("store",))
    foundation = node_config.get("foundation")
    return fedrec.device.open(
        Path(str(node_config["store"])),
        store_key(node_config),
        _policy(node_config),
        STORE_WAIT,
        None if not foundation else Path(str(foundation)),
    )


def _policy(node_config: Mapping[str, Any]) -> ParticipationPolicy:
    command = str(node_config.get("only-when", ""))
    condition: Callable[[], bool] | None = None
    if command:

        def condition() -> bool:
            return subprocess.run(command, shell=True, check=False).returncode == 0

    budget = node_config.get("epsilon-budget")
    return ParticipationPolicy(
        min_events=int(cast(int, node_config.get("min-events", ParticipationPolicy.min_events))),
        epsilon_budget=None if budget is None else float(cast(float, budget)),
        condition=condition,
        allow_without_dp=bool(node_config.get("allow-without-dp", False)),
    )


def config_of(context: Context) -> ExperimentConfig:
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        return device.config()


def client_of(context: Context) -> int:
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        client = device.enrolment()
    if client is None:
        raise PermissionError("this device is not enrolled: the server enrols it when it joins")
    return client


def identify(msg: Message, context: Context) -> Message:
    """Keep the server's config and catalogue, and the client this device is: the one the
    server enrolled its key as, else (a federation without SuperNode auth) the one its store
    or node config names."""
    sent = msg.content.config_records["config"]
    client = int(cast(int, sent.get("client", -1)))
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        if client < 0:
            held = device.enrolment()
            client = int(
                cast(int, context.node_config.get("partition-id", -1)) if held is None else held
            )
        device.accept_enrolment(client, str(sent["config"]), str(sent["catalogue"]))
    metrics = MetricRecord({"partition-id": client})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def participation(msg: Message, context: Context) -> Message:
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        reason = device.participation(_round(msg))
    answer = ConfigRecord({"joins": not reason, "reason": reason})
    return Message(RecordDict({"config": answer}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    sent = msg.content.config_records["config"]
    clip = sent.get(KEY_CLIPPING_NORM)
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        reply = device.train_round(
            state,
            _round(msg),
            str(sent["bundle-hash"]),
            None if clip is None else float(cast(float, clip)),
        )
    return reply_message(msg, reply)


def evaluate(msg: Message, context: Context) -> Message:
    sent = msg.content.config_records["config"]
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        config = device.config()
        if config.audit.enabled and config.audit.mode == "federated":
            raise ValueError(
                "the federated audit needs user attributes a device does not hold: set "
                "audit.mode: central (or audit.enabled: false) for a deployment of devices"
            )
        reply = device.evaluate_round(state, _round(msg), str(sent["bundle-hash"]))
    return reply_message(msg, reply)


def bundle(msg: Message, context: Context) -> Message:
    """The run's final model, published after its last round: kept as the latest bundle."""
    sent = msg.content.config_records["config"]
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    with open_device(context.node_config, str(context.run_config.get("run-dir", ""))) as device:
        device.accept_global(
            state, int(cast(int, sent["bundle-version"])), str(sent["bundle-hash"])
        )
    return Message(RecordDict({"metrics": MetricRecord({"kept": 1})}), reply_to=msg)


def _round(msg: Message) -> int:
    return int(cast(int, msg.content.config_records["config"]["server-round"]))


def reply_message(msg: Message, reply: ClientReply) -> Message:
    content = RecordDict({"metrics": MetricRecord(reply.metrics)})
    if reply.state is not None:
        content["arrays"] = state_record(reply.state)
    return Message(content, reply_to=msg)
