"""The environment for Flower processes started by tests and benchmarks: Flower and Ray keep
their state inside one folder, nothing calls out, nothing is installed at run time."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flower_env(home: Path) -> dict[str, str]:
    """An environment that keeps Flower and Ray inside ``home`` and off the network."""
    # Ray's socket paths must stay short, so its temp folder is not under pytest's tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    return {
        **os.environ,
        "FLWR_HOME": str(home / "flwr"),
        "RAY_TMPDIR": ray_tmp,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONPATH": str(REPO),
        # Flower's processes start helpers (flower-superexec, flwr-serverapp) by name.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
