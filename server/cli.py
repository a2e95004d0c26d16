"""``fedrec server ...``: the server's deployment with Flower's runtime (``server.deploy``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="The server: a TLS SuperLink with SuperNode auth, device enrolment, submitting runs.",
    no_args_is_help=True,
)

CertsOption = Annotated[Path, typer.Option("--certs", help="The folder `fedrec certs` wrote.")]
StateOption = Annotated[
    Path,
    typer.Option(
        "--state", help="The server's state: SuperLink database, flwr settings, enrolment.json."
    ),
]
SuperlinkOption = Annotated[
    str, typer.Option("--superlink", help="The SuperLink's HOST:PORT (its Control API).")
]


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def start(
    certs: CertsOption,
    state: StateOption = Path("server-state"),
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port of every Flower API.")] = 9093,
) -> None:
    """Run the SuperLink in the foreground: TLS with --certs, only registered SuperNode keys
    admitted, registrations and runs kept in --state (a restart keeps them). Stop: Ctrl-C."""
    from fedrec.federation.runtime import deployment_env
    from server.deploy import Credentials, superlink_command, write_flwr_settings

    credentials = Credentials(certs)
    try:
        state.mkdir(parents=True, exist_ok=True)
        command = superlink_command(credentials, host, port, state)
        home = write_flwr_settings(state, f"{host}:{port}", credentials.ca)
    except (ValueError, OSError) as err:
        _fail(err)
        return
    typer.echo(f"SuperLink on {host}:{port} (TLS, SuperNode auth); state in {state}")
    sys.exit(subprocess.call(command, env=deployment_env(home)))


@app.command()
def register(
    certs: CertsOption,
    key: Annotated[Path, typer.Option(help="The device's public key (DIR/devices/NAME.pub).")],
    superlink: SuperlinkOption = "127.0.0.1:9093",
    state: StateOption = Path("server-state"),
    name: Annotated[
        str | None, typer.Option(help="The device's name (default: the key file's stem).")
    ] = None,
) -> None:
    """Register a device's key with the SuperLink (`flwr supernode register`) and enrol the
    node ID it gets as the next client in STATE/enrolment.json."""
    from fedrec.federation.runtime import deployment_env, flower_binary
    from server.deploy import ENROLMENT, Credentials, write_flwr_settings
    from server.enrolment import register_device

    try:
        home = write_flwr_settings(state, superlink, Credentials(certs).ca)
        device = register_device(
            key, name or key.stem, state / ENROLMENT, flower_binary("flwr"), deployment_env(home)
        )
    except (ValueError, OSError, RuntimeError) as err:
        _fail(err)
        return
    typer.echo(f"{device.name}: node {device.node_id} enrolled as client {device.client}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The experiment YAML.")],
    certs: CertsOption,
    superlink: SuperlinkOption = "127.0.0.1:9093",
    state: StateOption = Path("server-state"),
    run_dir: Annotated[
        Path | None, typer.Option(help="The run folder (default: output_dir of the config).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run folder's checkpoint (after a crash).")
    ] = False,
) -> None:
    """Submit the federation to the SuperLink (`flwr run`) for the enrolled devices, and stream
    its log until it ends."""
    from fedrec.config import load_config
    from fedrec.federation.runtime import deployment_env
    from server.deploy import ENROLMENT, Credentials, run_command, write_flwr_settings

    try:
        folder = run_dir or Path(load_config(config).output_dir)
        if not (state / ENROLMENT).exists():
            raise FileNotFoundError(
                f"{state / ENROLMENT}: no device is enrolled; `fedrec server register` each one"
            )
        home = write_flwr_settings(state, superlink, Credentials(certs).ca)
        command = run_command(config, folder, state / ENROLMENT, resume)
    except (ValueError, OSError) as err:
        _fail(err)
        return
    sys.exit(subprocess.call(command, env=deployment_env(home)))
