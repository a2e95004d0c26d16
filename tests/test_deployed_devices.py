"""The deployment as the README's "Deploy" section runs it, on 127.0.0.1: `fedrec certs`, a TLS
SuperLink with SuperNode auth (`fedrec server start`), three devices enrolled by their keys
(`fedrec server register`), each an encrypted store holding one MovieLens-100K user's history
(`fedrec device init|import`) joined as a SuperNode (`fedrec device join`), and the run
(`fedrec server run`): record-level DP through TLS and authentication. Then the SuperLink and
ServerApp are killed mid-run and restarted with resume."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from fedrec.config import load_config
from fedrec.data import load_dataset
from fedrec.device.client import dataset_history

from .processes import REPO, flower_processes, free_ports, python, wait_for

USERS = ("196", "405", "13")  # 405: the heaviest user of ML-100K (737 ratings)


def fedrec(*args: str) -> list[str]:
    return [python(), "-m", "fedrec.cli", *args]


class Deployment:
    """The processes and folders of one deployment on loopback."""

    def __init__(self, root: Path, start: Callable[..., subprocess.Popen[bytes]], rounds: int):
        self.root, self.start = root, start
        self.link, *self.ports = free_ports(5)
        self.superlink = f"127.0.0.1:{self.link}"
        self.pki, self.state, self.run_dir = root / "pki", root / "server-state", root / "run"
        config = yaml.safe_load((REPO / "configs" / "ml-100k-deploy.yaml").read_text())
        config["data"]["path"] = str(REPO.parent / "shared" / "data" / "ml-100k")
        config["model"].update({"embedding_dim": 16, "num_blocks": 1})
        config["federated"]["num_rounds"] = rounds
        self.config = root / "deploy.yaml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.devices = [root / "devices" / f"device-{i}" for i in range(len(USERS))]
        self.link_process: subprocess.Popen[bytes] | None = None

    def run(self, args: list[str], log: str) -> None:
        done = self.start(args, log)
        assert done.wait(timeout=300) == 0, (self.root / log).read_text(errors="replace")[-3000:]

    def start_superlink(self, log: str) -> None:
        self.link_process = self.start(
            fedrec(
                "server",
                "start",
                "--certs",
                str(self.pki),
                "--state",
                str(self.state),
                "--port",
                str(self.link),
            ),
            log,
        )
        wait_for(
            lambda: "Uvicorn running on https" in (self.root / log).read_text(errors="replace"),
            timeout=180,
            what="the TLS SuperLink",
            log=self.root / log,
            watch=(self.link_process,),
        )

    def key_args(self, i: int) -> list[str]:
        return ["--store", str(self.devices[i]), "--key-file", str(self.devices[i]) + ".key"]

    def join(
        self, i: int, port: int, log: str, auth_key: str | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(
            fedrec(
                "device",
                "join",
                *self.key_args(i),
                "--superlink",
                self.superlink,
                "--root-cert",
                str(self.pki / "ca.pem"),
                "--auth-key",
                auth_key or str(self.pki / "devices" / f"device-{i}"),
                "--port",
                str(port),
            ),
            log,
        )

    def submit(self, log: str, resume: bool = False) -> subprocess.Popen[bytes]:
        return self.start(
            fedrec(
                "server",
                "run",
                "--config",
                str(self.config),
                "--certs",
                str(self.pki),
                "--superlink",
                self.superlink,
                "--state",
                str(self.state),
                "--run-dir",
                str(self.run_dir),
                *(["--resume"] if resume else []),
            ),
            log,
        )

    def set_up(self) -> None:
        """Certificates, the SuperLink, three enrolled devices with their histories, joined."""
        self.run(
            fedrec("certs", "--out", str(self.pki), "--host", "127.0.0.1", "--devices", "3"),
            "certs.log",
        )
        self.start_superlink("superlink.log")
        for i in range(len(USERS)):
            self.run(
                fedrec(
                    "server",
                    "register",
                    "--certs",
                    str(self.pki),
                    "--superlink",
                    self.superlink,
                    "--state",
                    str(self.state),
                    "--key",
                    str(self.pki / "devices" / f"device-{i}.pub"),
                ),
                f"register-{i}.log",
            )
            self.run(fedrec("device", "init", *self.key_args(i)), f"init-{i}.log")
            self.run(
                fedrec(
                    "device",
                    "import",
                    *self.key_args(i),
                    "--config",
                    str(self.config),
                    "--user",
                    USERS[i],
                ),
                f"import-{i}.log",
            )
        self.nodes = [self.join(i, self.ports[i], f"device-{i}.log") for i in range(len(USERS))]

    def device_output(self, i: int, *command: str) -> str:
        done = subprocess.run(
            fedrec("device", *command, *self.key_args(i)),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout


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
            for item, timestamp, _ in dataset_history(dataset, user)[:20]:
                assert str(timestamp).encode() not in raw
