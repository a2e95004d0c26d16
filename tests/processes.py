"""Start Flower's processes for a test and make sure every one of them is gone afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import ClassVar

import yaml

from simulations.flower_env import flower_env

REPO = Path(__file__).resolve().parents[1]


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line or environment names ``marker`` (our temp folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed, only waiting to be reaped by its parent)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _now_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _orphaned_ray_helpers(since_ticks: int) -> list[int]:
    """Ray agents started after ``since_ticks`` and orphaned: they rewrite their command line
    to ``ray::…`` and drop the environment, so no marker finds them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent, started = int(fields[1]), int(fields[19])
        if cmdline.startswith(b"ray::") and parent == 1 and started >= since_ticks:
            found.append(int(entry.name))
    return found


def stop_everything(
    env: dict[str, str], started: list[subprocess.Popen[bytes]], since_ticks: int
) -> list[int]:
    """Kill the started process groups, then any process (detached SuperLink, Ray helpers)
    that carries this test's FLWR_HOME or RAY_TMPDIR, and Ray agents orphaned since the test
    began. Returns the PIDs still alive."""
    for proc in started:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    markers = (env["FLWR_HOME"], env["RAY_TMPDIR"])

    def leftovers() -> list[int]:
        marked = [pid for marker in markers for pid in _pids_mentioning(marker)]
        return [p for p in marked + _orphaned_ray_helpers(since_ticks) if not _dead(p)]

    # Ray's helpers can still be starting (or dying slowly on a loaded machine) when the
    # driver is killed: kill again until none is left, for a bounded time.
    deadline = time.monotonic() + 20
    while (alive := leftovers()) and time.monotonic() < deadline:
        for pid in alive:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    return alive


@contextmanager
def flower_processes(
    home: Path,
) -> Iterator[tuple[dict[str, str], Callable[..., subprocess.Popen[bytes]]]]:
    """Yields the environment and a ``start(args, log_name)`` that launches a process in its own
    session; on exit every started process and its helpers are killed, and the test fails if any
    survives."""
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    started: list[subprocess.Popen[bytes]] = []
    since = _now_ticks()

    def start(args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (home / log_name).open("wb")
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(proc)
        return proc

    try:
        yield env, start
    finally:
        survivors = stop_everything(env, started, since)
        assert not survivors, f"processes outlived the test: {survivors}"


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    log: Path,
    watch: tuple[subprocess.Popen[bytes], ...] = (),
) -> None:
    """Poll ``condition``; fail on timeout, or at once if a ``watch``ed process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        dead = [p.args for p in watch if p.poll() is not None]
        if dead:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise AssertionError(f"{dead} exited while waiting for {what}\n{tail}")
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def python() -> str:
    return sys.executable


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def deploy_on_loopback(
    work: Path,
    config: Path,
    run_dir: Path,
    devices: list[Path],
    run_config: str = "",
    timeout: float = 300,
) -> None:
    """Flower's deployment on this machine, insecure: a SuperLink, one SuperNode per device
    folder (``store`` inside it holds that client's events; its catalogue and ledger go there
    too), and ``flwr run`` of this repository with ``config`` and ``run_dir``; returns once the
    run wrote ``results.json``, with every process stopped."""
    binaries = Path(python()).parent
    # Flower 1.42 serves the Runtime, Control and Fleet APIs over HTTP on one port.
    link, *ports = free_ports(len(devices) + 1)
    with flower_processes(work) as (env, start):
        flwr_home = Path(env["FLWR_HOME"])
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n',
            encoding="utf-8",
        )
        superlink = start(
            [
                str(binaries / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
            ],
            "superlink.log",
        )
        nodes = [
            start(
                [
                    str(binaries / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={partition} num-partitions={len(devices)} "
                    f"store='{device / 'store'}' catalogue='{device / 'catalogue.json'}' "
                    f"ledger-dir='{device}'",
                ],
                f"supernode-{partition}.log",
            )
            for partition, (port, device) in enumerate(zip(ports, devices, strict=True))
        ]
        settings = (
            f"config='{config}' run-dir='{run_dir}' deployment=true unauthenticated=true "
            f"{run_config}"
        ).strip()
        submit = start(
            [
                str(binaries / "flwr"),
                *("run", str(REPO), "loopback", "--run-config", settings, "--stream"),
            ],
            "flwr-run.log",
        )
        wait_for(
            lambda: (run_dir / "results.json").exists(),
            timeout=timeout,
            what="the deployed run's results.json",
            log=work / "superlink.log",
            watch=(superlink, *nodes, submit),
        )


def fedrec(*args: str) -> list[str]:
    return [python(), "-m", "fedrec.cli", *args]


class Deployment:
    """A deployment of devices on loopback, as the README's "Deploy" runs it: `fedrec certs`,
    a TLS SuperLink with SuperNode auth, three devices enrolled by key, each an encrypted store
    holding one MovieLens-100K user's history, joined with `fedrec device join`; `submit`
    starts the run. ``start`` launches a process (``flower_processes``)."""

    USERS = ("196", "405", "13")  # 405: the heaviest user of ML-100K (737 ratings)

    TEST_MODEL: ClassVar[dict[str, int]] = {"embedding_dim": 16, "num_blocks": 1}  # smaller HSTU

    def __init__(
        self,
        root: Path,
        start: Callable[..., subprocess.Popen[bytes]],
        rounds: int,
        model: dict[str, int] | None = None,
    ):
        self.root, self.start = root, start
        self.link, *self.ports = free_ports(5)
        self.superlink = f"127.0.0.1:{self.link}"
        self.pki, self.state, self.run_dir = root / "pki", root / "server-state", root / "run"
        config = yaml.safe_load((REPO / "configs" / "ml-100k-deploy.yaml").read_text())
        config["data"]["path"] = str(REPO.parent / "shared" / "data" / "ml-100k")
        config["model"].update(self.TEST_MODEL if model is None else model)
        config["federated"]["num_rounds"] = rounds
        self.config = root / "deploy.yaml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.devices = [root / "devices" / f"device-{i}" for i in range(len(self.USERS))]
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
                *self.server_args(),
                "--run-dir",
                str(self.run_dir),
                *(["--resume"] if resume else []),
            ),
            log,
        )

    def server_args(self) -> list[str]:
        return ["--certs", str(self.pki), "--superlink", self.superlink, "--state", str(self.state)]

    def set_up(self) -> None:
        """Certificates, the SuperLink, three enrolled devices with their histories, joined."""
        self.run(
            fedrec("certs", "--out", str(self.pki), "--host", "127.0.0.1", "--devices", "3"),
            "certs.log",
        )
        self.start_superlink("superlink.log")
        for i in range(len(self.USERS)):
            self.run(
                fedrec(
                    "server",
                    "register",
                    *self.server_args(),
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
                    self.USERS[i],
                ),
                f"import-{i}.log",
            )
        self.nodes = [
            self.join(i, self.ports[i], f"device-{i}.log") for i in range(len(self.USERS))
        ]

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
