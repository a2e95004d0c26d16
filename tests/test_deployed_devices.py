"""The deployment as the README's "Deploy" section runs it, on 127.0.0.1: `fedrec certs`, a TLS
SuperLink with SuperNode auth (`fedrec server start`), three devices enrolled by their keys
(`fedrec server register`), each an encrypted store holding one MovieLens-100K user's history
(`fedrec device init|import`) joined as a SuperNode (`fedrec device join`), and the run
(`fedrec server run`): record-level DP through TLS and authentication. Then the SuperLink and
ServerApp are killed mid-run and restarted with resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedrec.config import load_config
from fedrec.data import load_dataset
from fedrec.data.catalogue import ItemCatalogue
from fedrec.device.client import dataset_history
from fedrec.federated_models import initial_federated_model
from fedrec.federation.layout import CATALOGUE_FILE
from fedrec.privacy import PrivacyLedger
from fedrec.serving.bundle import BUNDLE_DIR, BUNDLE_FILE, ModelBundle
from fedrec.serving.service import newest_bundle
from fedrec.serving.store import SERVING_DIR, load_serving_bundle

from .processes import Deployment, flower_processes, wait_for

USERS = Deployment.USERS


def _said(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_devices_run_three_rounds_through_tls_and_supernode_auth(tmp_path):
    with flower_processes(tmp_path) as (_env, start):
        deployment = Deployment(tmp_path, start, rounds=3)
        deployment.set_up()
        # A second SuperNode with device 0's key while device 0 is online: refused.
        link_log = tmp_path / "superlink.log"
        wait_for(
            lambda: link_log.read_text(errors="replace").count("Activated node_id") >= 3,
            timeout=180,
            what="three devices activated",
            log=link_log,
            watch=tuple(deployment.nodes),
        )
        twin = deployment.join(0, deployment.ports[3], "twin.log")
        wait_for(
            _said(tmp_path / "twin.log", "Failed to activate SuperNode"),
            timeout=120,
            what="the twin refused",
            log=tmp_path / "twin.log",
        )
        twin.send_signal(signal.SIGKILL)
        submit = deployment.submit("run.log")
        wait_for(
            lambda: (deployment.run_dir / "results.json").exists(),
            timeout=600,
            what="the deployed run's results.json",
            log=tmp_path / "run.log",
            watch=(submit, *deployment.nodes),
        )
        results = json.loads((deployment.run_dir / "results.json").read_text())
        assert results["rounds"] == 3 and not results["failed"]
        # every message went to an enrolled device, by its authenticated node id
        enrolment = json.loads((deployment.state / "enrolment.json").read_text())["devices"]
        assert sorted(d["client"] for d in enrolment) == [0, 1, 2]
        checkpoint = torch.load(deployment.run_dir / "checkpoint.pt", weights_only=True)
        booked = sorted(
            (e["party"], e["round"])
            for e in checkpoint["ledger"]["events"]
            if e["mechanism"] == "dp-sgd"
        )
        assert booked == sorted((f"client:{c}", r) for c in range(3) for r in (1, 2, 3))
        # the global model moved from the seeded round-0 model
        final = ModelBundle.from_bytes(
            (deployment.run_dir / BUNDLE_DIR / BUNDLE_FILE).read_bytes(), "latest.bundle"
        )
        assert final.version == 3
        # the serving bundle of round 3: the same model, the ledger's ε at that round
        served = load_serving_bundle(newest_bundle(deployment.run_dir / SERVING_DIR))
        assert served.version == 3 and served.epsilon[2].startswith("record-level")
        assert served.epsilon[0] == pytest.approx(results["final"]["epsilon"]["client_max"])
        state = served.sequential.state_dict()
        assert all(torch.equal(state[k], final.state[k]) for k in final.state)
        catalogue = ItemCatalogue.load(deployment.run_dir / CATALOGUE_FILE)
        config = load_config(deployment.config)
        initial = initial_federated_model(config, catalogue, deployment.run_dir).shared_state()
        assert any(not torch.equal(initial[k], final.state[k]) for k in initial)
        for node in deployment.nodes:  # the devices' stores are theirs again
            node.send_signal(signal.SIGINT)
        for node in deployment.nodes:
            node.wait(timeout=60)
        # each device: its ε, 10 unseen recommendations, nothing readable at rest
        dataset = load_dataset(load_config(deployment.config).data)
        for i, user in enumerate(USERS):
            statement = deployment.device_output(i, "privacy")
            assert "took part in 3 federated round(s)" in statement, statement
            shown = deployment.device_output(i, "recommend").splitlines()
            assert "the global model of round 3" in shown[0]  # the final bundle reached it
            top = shown[1:]
            assert len(top) == 10
            exported = json.loads(deployment.device_output(i, "export"))
            seen = {e["item"] for e in exported["events"]}
            assert not seen & {line.rsplit("(item ", 1)[1].rstrip(")") for line in top}
            raw = b"".join(p.read_bytes() for p in deployment.devices[i].iterdir() if p.is_file())
            titles = dataset.item_features["title"]
            index = {str(r): n for n, r in enumerate(dataset.raw_item_ids.tolist())}
            for item, timestamp, *_ in dataset_history(dataset, user)[:20]:
                assert str(timestamp).encode() not in raw
                assert titles[index[item]].encode() not in raw


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"])
    except (OSError, RuntimeError, EOFError):
        return -1  # not written yet (or being replaced)


def _kill_server_processes(marker: str) -> list[str]:
    """SIGKILL the SuperLink, its ServerApp and `flwr run` (the devices keep running)."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        server_side = any(
            name in cmdline
            for name in (
                "flower-superlink",
                "flwr-serverapp",
                "flower-superexec --plugin-type serverapp",
                " server start",
                " server run",
                "flwr run",
            )
        )
        if server_side and marker.encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
            killed.append(cmdline)
    return killed


def _client_events(events: list[dict], client: int) -> list[tuple[int, int]]:
    """(round, steps) of a client's DP-SGD releases, in order."""
    return [
        (e["round"], e["steps"])
        for e in events
        if e["party"] == f"client:{client}" and e["mechanism"] == "dp-sgd"
    ]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_server_killed_mid_run_resumes_and_every_ledger_stays_continuous(tmp_path):
    """The SuperLink, the ServerApp and `flwr run` are killed once round 1 is checkpointed; the
    SuperLink restarts from its database and the run resumes from the checkpoint. The devices
    never stop. The server's ledger never loses an event, every device's ledger holds every
    release the server booked for it (and any of an interrupted round whose reply was lost),
    ε never decreases, and no release is booked twice."""
    with flower_processes(tmp_path) as (env, start):
        deployment = Deployment(tmp_path, start, rounds=3)
        deployment.set_up()
        submit = deployment.submit("run.log")
        wait_for(
            lambda: _checkpoint_round(deployment.run_dir) >= 1,
            timeout=600,
            what="round 1's checkpoint",
            log=tmp_path / "run.log",
            watch=(submit, *deployment.nodes),
        )
        before = torch.load(deployment.run_dir / "checkpoint.pt", weights_only=True)
        killed = _kill_server_processes(env["RAY_TMPDIR"])
        assert any("flower-superlink" in k for k in killed), killed
        assert not (deployment.run_dir / "results.json").exists()
        deployment.start_superlink("superlink-restarted.log")
        resumed = deployment.submit("run-resumed.log", resume=True)
        wait_for(
            lambda: (deployment.run_dir / "results.json").exists(),
            timeout=900,
            what="the resumed run's results.json",
            log=tmp_path / "run-resumed.log",
            watch=(resumed, *deployment.nodes),
        )
        assert all(node.poll() is None for node in deployment.nodes)  # the devices never stopped
        results = json.loads((deployment.run_dir / "results.json").read_text())
        assert results["rounds"] == 3 and not results["failed"]
        after = torch.load(deployment.run_dir / "checkpoint.pt", weights_only=True)
        old, new = before["ledger"]["events"], after["ledger"]["events"]
        assert new[: len(old)] == old  # the server's ledger continued, never reset
        for node in deployment.nodes:
            node.send_signal(signal.SIGINT)
        for node in deployment.nodes:
            node.wait(timeout=60)
        for i in range(len(USERS)):
            exported = json.loads(deployment.device_output(i, "export"))
            device_events = exported["privacy"]["ledger"]["events"]
            on_device = _client_events(device_events, i)
            on_server = _client_events(new, i)
            # every round released, in order; the server booked nothing the device did not
            assert {r for r, _ in on_server} == {1, 2, 3}
            assert [r for r, _ in on_device] == sorted(r for r, _ in on_device)
            assert all(on_device.count(e) >= on_server.count(e) for e in on_server)
            assert len(on_device) - len(on_server) <= 1  # at most the lost reply of the kill
            # ε as it grew on the device never decreased, and the server never states less
            ledger = PrivacyLedger()
            ledger.load_state_dict(exported["privacy"]["ledger"])
            delta = ledger.events[0].delta
            by_round = ledger.epsilon_by_round(f"client:{i}", delta)
            assert sorted(by_round) == [1, 2, 3]
            assert all(
                a <= b
                for a, b in zip(list(by_round.values()), list(by_round.values())[1:], strict=False)
            )
            server = PrivacyLedger()
            server.load_state_dict(after["ledger"])
            assert (
                server.epsilon(f"client:{i}", delta) <= ledger.epsilon(f"client:{i}", delta) + 1e-9
            )
