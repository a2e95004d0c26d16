"""Checkpoints load without pickle, a broken one is named in one line, and --resume never
silently starts again (issue 14)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.errors import FedrecDataError
from fedrec.files import load_checkpoint

from .processes import python


class _Payload:
    """What a crafted checkpoint unpickles: a call to os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_nothing_and_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"ledger": _Payload(marker)}, run / "checkpoint.pt")
    result = CliRunner().invoke(app, ["privacy-report", str(run)])
    assert not marker.exists()  # the payload never ran
    assert result.exit_code != 0
    assert str(run / "checkpoint.pt") in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(FedrecDataError, match=r"checkpoint\.pt: not a checkpoint fedrec can load"):
        load_checkpoint(path)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    result = subprocess.run(
        [python(), "-m", "fedrec.cli", "simulate", "-c", str(config), "--resume"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--resume needs the checkpoint of an earlier run" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_server_checkpoint_state_round_trips_without_pickle(tmp_path):
    """FedAdam's moments and numpy's RNG state are stored as tensors and come back as arrays."""
    import random

    import numpy as np

    from fedrec.files import save_atomic
    from server.federation import _numpy, _tensors

    moments = [{"m_t": [np.ones((2, 3)), np.zeros(4)], "v_t": None}, {}]
    rng = np.random.get_state()
    state = {
        "strategy": _tensors(moments),
        "rng": {"python": random.getstate(), "numpy": _tensors(rng)},
    }
    save_atomic(state, tmp_path / "checkpoint.pt")
    back = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    restored = _numpy(back["strategy"])
    np.testing.assert_array_equal(restored[0]["m_t"][0], moments[0]["m_t"][0])
    assert restored[0]["v_t"] is None and restored[1] == {}
    np.random.set_state(_numpy(back["rng"]["numpy"]))
    assert np.random.random() == (np.random.set_state(rng), np.random.random())[1]
