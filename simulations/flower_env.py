"""The environment for Flower processes started by tests and benchmarks: Flower and Ray keep
their state inside one folder, nothing calls out, nothing is installed at run time."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedrec.federation.runtime import deployment_env

REPO = Path(__file__).resolve().parents[1]


def flower_env(home: Path) -> dict[str, str]:
    """An environment that keeps Flower and Ray inside ``home`` and off the network."""
    # Ray's socket paths must stay short, so its temp folder is not under pytest's tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    return {**deployment_env(home / "flwr"), "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
