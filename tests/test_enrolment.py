"""Enrolment: a device's client is the node ID its registered key got, filed by the server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fedrec.errors import FedrecDataError
from server.enrolment import ENROLMENT_FORMAT, load_enrolment, register_device

# Stands in for `flwr supernode register KEY --name NAME --format json` (the slow deployment
# tests run Flower's own): node ID from the key's length, or a failure for a key named "bad".
FAKE_FLWR = """#!{python}
import json, sys
key = sys.argv[3]
if "bad" in key:
    print("SuperNode couldn't be registered.", file=sys.stderr)
    sys.exit(1)
print(json.dumps({{"success": True, "node-id": 1000 + len(open(key).read())}}))
"""


@pytest.fixture
def flwr(tmp_path: Path) -> str:
    path = tmp_path / "flwr"
    path.write_text(FAKE_FLWR.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _key(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / f"{name}.pub"
    path.write_text("k" * size)
    return path


def test_devices_are_enrolled_as_the_next_clients_by_node_id(tmp_path, flwr):
    enrolment = tmp_path / "state" / "enrolment.json"
    first = register_device(_key(tmp_path, "a", 5), "a", enrolment, flwr, dict(os.environ))
    second = register_device(_key(tmp_path, "b", 7), "b", enrolment, flwr, dict(os.environ))
    assert (first.node_id, first.client, second.node_id, second.client) == (1005, 0, 1007, 1)
    loaded = load_enrolment(enrolment)
    assert {n: d.client for n, d in loaded.items()} == {1005: 0, 1007: 1}
    with pytest.raises(ValueError, match="already enrolled as client 0"):
        register_device(_key(tmp_path, "a", 5), "again", enrolment, flwr, dict(os.environ))
    with pytest.raises(RuntimeError, match="couldn't be registered"):
        register_device(_key(tmp_path, "bad", 9), "bad", enrolment, flwr, dict(os.environ))
    assert len(load_enrolment(enrolment)) == 2  # a failed registration enrols nothing


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("{", "not valid JSON"),
        (json.dumps({"format": "other"}), "not an enrolment file"),
        (json.dumps({"format": ENROLMENT_FORMAT, "devices": [{"node_id": 1}]}), "malformed"),
        (
            json.dumps(
                {
                    "format": ENROLMENT_FORMAT,
                    "devices": [
                        {"node_id": 1, "client": 0, "name": "a", "public_key_sha256": "x"},
                        {"node_id": 2, "client": 0, "name": "b", "public_key_sha256": "y"},
                    ],
                }
            ),
            "enrolled twice",
        ),
    ],
)
def test_a_bad_enrolment_file_is_an_error_naming_it(tmp_path, document, error):
    path = tmp_path / "enrolment.json"
    path.write_text(document)
    with pytest.raises(FedrecDataError, match=error) as raised:
        load_enrolment(path)
    assert str(path) in str(raised.value)
    with pytest.raises(FedrecDataError, match="fedrec server register"):
        load_enrolment(tmp_path / "missing.json")


def test_a_deployment_without_an_enrolment_is_refused_unless_marked_unauthenticated(tmp_path):
    from flwr.app import Context, RecordDict

    from server.app import main

    config = Path(__file__).resolve().parents[1] / "configs" / "federated-synthetic.yaml"
    run_config = {"config": str(config), "run-dir": str(tmp_path), "deployment": True}
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(ValueError, match="takes each device's client from its enrolled key"):
        main(object(), context)  # type: ignore[arg-type]  # refused before the grid is used
