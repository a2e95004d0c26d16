"""The environment of Flower's deployment processes (SuperLink, SuperNode, ``flwr``), shared by
the server's and the device's commands and by the tests, so each starts them the same way."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def deployment_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: ``flwr`` settings in ``flwr_home``, no telemetry,
    nothing installed at run time, and this Python's scripts first on PATH (the SuperLink and
    SuperNode start ``flower-superexec`` and the app processes by name)."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def flower_binary(name: str) -> str:
    return str(Path(sys.executable).parent / name)
