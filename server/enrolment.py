"""Which client each device is: its authenticated SuperNode key, never a number it chooses.

With ``--enable-supernode-auth`` the SuperLink admits a SuperNode only with a registered key
(``flwr supernode register``) and gives each key one node ID, online at most once at a time.
``register_device`` registers a device's public key through Flower's own command and files the
node ID it returns under the next client number in the enrolment file (``enrolment.json``,
beside the run). The ServerApp (run config ``enrolment``) then tells each node which client it
is, books ledger events and budgets under that client, and refuses a node that is not enrolled
or claims another client (``server.rounds.IdentifiedGrid``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from fedrec.errors import FedrecDataError

ENROLMENT_FORMAT = "fedrec-enrolment/1"


@dataclass(frozen=True)
class EnrolledDevice:
    node_id: int
    client: int
    name: str
    public_key_sha256: str


def load_enrolment(path: Path) -> dict[int, EnrolledDevice]:
    """The enrolled devices by node ID; a malformed file is an error naming it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedrecDataError(
            "no enrolment file: register each device with `fedrec server register`", path
        ) from None
    except json.JSONDecodeError as err:
        raise FedrecDataError(f"not valid JSON ({err.msg})", path, err.lineno) from None
    if not isinstance(document, dict) or document.get("format") != ENROLMENT_FORMAT:
        raise FedrecDataError(f"not an enrolment file of format {ENROLMENT_FORMAT!r}", path)
    try:
        devices = [EnrolledDevice(**entry) for entry in document["devices"]]
    except (KeyError, TypeError) as err:
        raise FedrecDataError(f"malformed enrolment ({err})", path) from None
    clients = [d.client for d in devices]
    if len(set(clients)) != len(clients) or len({d.node_id for d in devices}) != len(devices):
        raise FedrecDataError("a node ID or client number is enrolled twice", path)
    return {d.node_id: d for d in devices}


def register_device(
    public_key: Path, name: str, enrolment: Path, flwr: str, env: dict[str, str]
) -> EnrolledDevice:
    """Register ``public_key`` with the SuperLink (``flwr supernode register``, with ``flwr``
    and ``env`` naming the federation) and enrol the node ID it gets as the next client (one
    registration at a time: a lock file beside the enrolment)."""
    enrolment.parent.mkdir(parents=True, exist_ok=True)
    with open(enrolment.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _register(public_key, name, enrolment, flwr, env)


def _register(
    public_key: Path, name: str, enrolment: Path, flwr: str, env: dict[str, str]
) -> EnrolledDevice:
    devices = load_enrolment(enrolment) if enrolment.exists() else {}
    key_hash = hashlib.sha256(public_key.read_bytes()).hexdigest()
    for device in devices.values():
        if device.public_key_sha256 == key_hash or device.name == name:
            raise ValueError(
                f"{public_key}: already enrolled as client {device.client} ({device.name!r}, "
                f"node {device.node_id})"
            )
    done = subprocess.run(
        [flwr, "supernode", "register", str(public_key), "--name", name, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r'"node-id":\s*(\d+)', done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"flwr supernode register failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-2000:]}"
        )
    node_id = int(found.group(1))
    client = max((d.client for d in devices.values()), default=-1) + 1
    device = EnrolledDevice(node_id, client, name, key_hash)
    devices[node_id] = device
    document = {
        "format": ENROLMENT_FORMAT,
        "devices": [asdict(d) for d in sorted(devices.values(), key=lambda d: d.client)],
    }
    tmp = enrolment.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, enrolment)
    return device
