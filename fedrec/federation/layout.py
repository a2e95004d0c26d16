"""Where a federated run keeps its files, and where a client keeps its own.

The run folder (the server's): ``metrics.jsonl``, ``audit.jsonl``, ``checkpoint.pt``,
``results.json``, the reports, and the published item catalogue ``catalogue.json``.

A client keeps only its own files: its event store, its privacy ledger (never deleted by
fedrec: ε belongs to the user and outlives runs) and its personal prompt. A device names them
in its node config (``store``, ``catalogue``, ``ledger-dir``). A simulated device of partition
N uses the run folder: ``client-stores/client-N/`` (written from the population at the start of
each run), ``devices/client-N.json`` (its ledger; ``make demo`` removes ``devices/`` to simulate
new devices) and ``client-state/client-N-personal.safetensors`` (cleared on a fresh run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CATALOGUE_FILE = "catalogue.json"
STORE_DIR = "client-stores"
DEVICE_DIR = "devices"
CLIENT_STATE_DIR = "client-state"
LEGACY_LEDGER_DIR = "client-ledgers"  # where simulated devices kept ledgers before devices/
CHECKPOINT_FILE = "checkpoint.pt"
ROUND_LOGS = ("metrics.jsonl", "audit.jsonl")  # one line per round each, trimmed on resume


def simulated_store(run_dir: Path, partition: int) -> Path:
    return run_dir / STORE_DIR / f"client-{partition}"


def client_paths(run_dir: Path, node_config: Mapping[str, Any]) -> tuple[Path, Path, Path, Path]:
    """(store, catalogue, ledger, personal prompt) of the client a node runs: what its node
    config names (a device), else its simulated device's files in ``run_dir``. A device names
    all three of its folders, none inside the server's run folder (which a fresh run clears)."""
    partition = int(node_config["partition-id"])
    if node_config.get("store"):
        own_folders(run_dir, node_config, ("store", "catalogue", "ledger-dir"))
    store = node_config.get("store") or simulated_store(run_dir, partition)
    catalogue = node_config.get("catalogue") or run_dir / CATALOGUE_FILE
    own = node_config.get("ledger-dir")
    ledger = Path(str(own or run_dir / DEVICE_DIR)) / f"client-{partition}.json"
    personal = Path(str(own or run_dir / CLIENT_STATE_DIR)) / (
        f"client-{partition}-personal.safetensors"
    )
    return Path(str(store)), Path(str(catalogue)), ledger, personal


def own_folders(run_dir: Path, node_config: Mapping[str, Any], names: tuple[str, ...]) -> None:
    """Refuse a device whose node config lacks one of ``names`` or puts one inside
    ``run_dir``: a device's files and the server's run folder never share a path."""
    missing = [name for name in names if not node_config.get(name)]
    if missing:
        raise ValueError(
            f"a device's node config names its own store, catalogue and ledger-dir; {missing} "
            "missing (the run folder is the server's)"
        )
    server = run_dir.resolve()
    for name in names:
        path = Path(str(node_config[name])).resolve()
        if path == server or server in path.parents:
            raise ValueError(
                f"node config {name} {path} is inside the server's run folder {server}: a "
                "device keeps its files in its own folder"
            )


CONFIG_ENV = "FEDREC_CONFIG"
RUN_DIR_ENV = "FEDREC_RUN_DIR"


def resolve_config_path(run_config: Mapping[str, Any]) -> str:
    """The experiment YAML of a Flower run: ``config`` of the run config (``flwr run``), else
    ``$FEDREC_CONFIG`` (set by ``fedrec simulate``, whose apps get an empty run config)."""
    path = str(run_config.get("config", "") or os.environ.get(CONFIG_ENV, ""))
    if not path:
        raise ValueError(
            f"no experiment config: set `config` in [tool.flwr.app.config] or ${CONFIG_ENV}"
        )
    return path


def resolve_run_dir(run_config: Mapping[str, Any], default: str) -> Path:
    """The run folder: ``run-dir`` of the run config, else ``$FEDREC_RUN_DIR``, else ``default``."""
    return Path(str(run_config.get("run-dir", "") or os.environ.get(RUN_DIR_ENV, "") or default))
