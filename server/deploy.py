"""The server's deployment with Flower's own runtime: a SuperLink with TLS and SuperNode auth,
devices registered through ``flwr supernode register``, runs submitted with ``flwr run``.

These functions build the command lines and the ``flwr`` CLI's settings (``FLWR_HOME``) that
``fedrec server start|register|run`` and the tests use, so every way of deploying starts the
same processes with the same flags. The server's state folder holds the SuperLink's database
(node registrations survive a restart), the ``flwr`` settings and ``enrolment.json``; it never
holds a device's store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedrec.federation.runtime import flower_binary
from server.certs import CA_CERT, SERVER_CERT, SERVER_KEY

REPO = Path(__file__).resolve().parents[1]
FEDERATION = "fedrec"  # the SuperLink connection's name in the flwr CLI's config.toml
DATABASE, ENROLMENT, FLWR_HOME = "superlink.db", "enrolment.json", "flwr"


@dataclass(frozen=True)
class Credentials:
    """What ``fedrec certs --out DIR`` wrote, by the names it uses."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def device_key(self, name: str) -> Path:
        return self.folder / "devices" / name

    def check(self) -> None:
        missing = [p for p in (self.ca, self.server_cert, self.server_key) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(map(str, missing))} missing: make them with `fedrec certs --out "
                f"{self.folder} --host HOST`"
            )


def superlink_command(certs: Credentials, host: str, port: int, state: Path) -> list[str]:
    """A SuperLink serving TLS with ``certs`` on ``host:port`` that admits registered
    SuperNode keys only, its state (registrations, runs) in ``state``."""
    certs.check()
    return [
        flower_binary("flower-superlink"),
        *("--ssl-ca-certfile", str(certs.ca)),
        *("--ssl-certfile", str(certs.server_cert)),
        *("--ssl-keyfile", str(certs.server_key)),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        *("--host", host, "--port", str(port)),
        *("--database", str(state / DATABASE)),
    ]


def write_flwr_settings(state: Path, superlink: str, ca: Path) -> Path:
    """The ``flwr`` CLI's config.toml naming this SuperLink (TLS with ``ca``); returns its
    ``FLWR_HOME``."""
    home = state / FLWR_HOME
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{ca.resolve()}"\n',
        encoding="utf-8",
    )
    return home


def run_command(config: Path, run_dir: Path, enrolment: Path, resume: bool) -> list[str]:
    """``flwr run`` of this app on the SuperLink in the settings, as a deployment: devices hold
    their own stores, and the enrolment says which client each authenticated node is."""
    settings = (
        f"config='{config.resolve()}' run-dir='{run_dir.resolve()}' deployment=true "
        f"enrolment='{enrolment.resolve()}' resume={str(resume).lower()}"
    )
    return [
        flower_binary("flwr"),
        *("run", str(REPO), FEDERATION, "--run-config", settings, "--stream"),
    ]
