"""``fedrec device ...``: a device's encrypted store from the command line, and joining a
deployment. The same calls an app makes through ``fedrec.device`` (the SDK)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the commands import fedrec lazily: `--help` stays fast
    from fedrec.device.client import Event

app = typer.Typer(
    help="A device: its encrypted store (events, ledger, model bundle) and joining a deployment.",
    no_args_is_help=True,
)

StoreOption = Annotated[Path, typer.Option("--store", help="The device's store folder.")]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="A 32-byte key file, owner-only (a stand-in for the OS keystore; `init` makes it).",
    ),
]
PassphraseOption = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env",
        help="Instead of --key-file: the environment variable holding a passphrase (scrypt).",
    ),
]


def _node_config(store: Path, key_file: Path | None, passphrase_env: str | None) -> dict[str, Any]:
    if (key_file is None) == (passphrase_env is None):
        raise typer.BadParameter("give exactly one of --key-file and --passphrase-env")
    config: dict[str, Any] = {"store": str(store.resolve())}
    if key_file is not None:
        config["key-file"] = str(key_file.resolve())
    else:
        config["passphrase-env"] = passphrase_env
    return config


def _open(store: Path, key_file: Path | None, passphrase_env: str | None):  # type: ignore[no-untyped-def]
    import fedrec.device
    from clients.device import store_key

    return fedrec.device.open(store, store_key(_node_config(store, key_file, passphrase_env)))


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def init(
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
) -> None:
    """Make the device's encrypted store (and, with --key-file, a new random key if the file
    does not exist; keep it in the OS keystore on a real device)."""
    if key_file is not None and not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(os.urandom(32))
        typer.echo(f"wrote {key_file} (the store's key: losing it loses the store)")
    try:
        with _open(store, key_file, passphrase_env):
            typer.echo(f"store ready in {store}")
    except (ValueError, OSError) as err:
        _fail(err)


@app.command("import")
def import_events(
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    events: Annotated[
        Path | None,
        typer.Option(
            help="A CSV of item,timestamp[,kind[,rating]] rows (a header row is skipped)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="With --user: the experiment config whose data holds it.")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="A user of --config's data set: their whole history.")
    ] = None,
) -> None:
    """Record past events in one transaction: from a CSV, or one user's history of a data set
    with their ratings and attributes (a device that starts with what its user already did)."""
    from fedrec.config import load_config
    from fedrec.data import load_dataset
    from fedrec.device.client import dataset_attributes, dataset_history

    try:
        attributes = None
        rows: list[Event]
        if events is not None:
            rows = _csv_events(events)
        elif config is not None and user is not None:
            dataset = load_dataset(load_config(config).data)
            rows = dataset_history(dataset, user)
            attributes = dataset_attributes(dataset, user)
        else:
            raise typer.BadParameter("give --events, or --config and --user")
        with _open(store, key_file, passphrase_env) as device:
            known = device.record_many(rows)
            if attributes:
                device.set_attributes(attributes)
        typer.echo(f"recorded {len(rows)} events ({len(rows) - sum(known)} of unknown items)")
    except (ValueError, OSError) as err:
        _fail(err)


def _csv_events(path: Path) -> list[Event]:
    rows: list[Event] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if line == 1 and (len(row) < 2 or not row[1].strip().isdigit()):
                continue  # a header
            if len(row) < 2 or not row[1].strip().isdigit():
                raise ValueError(
                    f"{path}:{line}: expected item,timestamp[,kind[,rating]], got {row}"
                )
            kind = row[2].strip() if len(row) > 2 and row[2].strip() else "view"
            try:
                rating = float(row[3]) if len(row) > 3 and row[3].strip() else None
            except ValueError:
                raise ValueError(f"{path}:{line}: rating {row[3]!r} is not a number") from None
            rows.append((row[0].strip(), int(row[1]), kind, rating))
    return rows


@app.command()
def record(
    item: Annotated[str, typer.Argument(help="The item's raw id (as the catalogue lists it).")],
    timestamp: Annotated[int, typer.Argument(help="When, in whole seconds.")],
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    kind: Annotated[str, typer.Option(help="What the user did.")] = "view",
) -> None:
    """Record one event."""
    try:
        with _open(store, key_file, passphrase_env) as device:
            known = device.record(item, timestamp, kind)
        typer.echo("recorded" if known else f"recorded; {item!r} is not in the catalogue (kept)")
    except (ValueError, OSError) as err:
        _fail(err)


@app.command()
def recommend(
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    k: Annotated[int, typer.Option(help="How many items.")] = 10,
) -> None:
    """The top K unseen items, on this device from its latest model bundle (no network)."""
    try:
        with _open(store, key_file, passphrase_env) as device:
            top = device.recommend(k)
            bundle = device.bundle()
        assert bundle is not None  # recommend needs one
        typer.echo(
            f"from the global model of round {bundle.version} (bundle {bundle.content_hash[:12]}):"
        )
        for rank, item in enumerate(top, start=1):
            typer.echo(f"{rank:3d}. {item.title or item.item}  (item {item.item})")
    except (ValueError, OSError) as err:
        _fail(err)


@app.command()
def privacy(
    store: StoreOption, key_file: KeyFileOption = None, passphrase_env: PassphraseOption = None
) -> None:
    """The device's privacy statement: ε spent, δ, budget left, rounds joined."""
    try:
        with _open(store, key_file, passphrase_env) as device:
            typer.echo(device.privacy_statement())
    except (ValueError, OSError) as err:
        _fail(err)


@app.command()
def export(
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON here (default: stdout).")] = None,
) -> None:
    """Everything the store holds about the user, as JSON."""
    try:
        with _open(store, key_file, passphrase_env) as device:
            text = json.dumps(device.export(), indent=1, ensure_ascii=False)
        if out is None:
            typer.echo(text)
        else:
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            os.replace(tmp, out)  # owner-only, whatever a file there allowed
            typer.echo(f"wrote {out}")
    except (ValueError, OSError) as err:
        _fail(err)


@app.command()
def forget(
    store: StoreOption,
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do it without asking.")] = False,
) -> None:
    """Delete the user's events and personal parameters, and the key they were sealed with.
    The ledger stays while the device is enrolled: spent ε is not refunded."""
    if not yes and not typer.confirm(f"forget everything about the user in {store}?"):
        raise typer.Exit(code=1)
    try:
        with _open(store, key_file, passphrase_env) as device:
            device.forget()
            typer.echo(device.privacy_statement())
    except (ValueError, OSError) as err:
        _fail(err)


@app.command()
def join(
    store: StoreOption,
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    root_cert: Annotated[Path, typer.Option(help="The deployment's CA certificate (ca.pem).")],
    auth_key: Annotated[Path, typer.Option(help="This device's private key (fedrec certs).")],
    key_file: KeyFileOption = None,
    passphrase_env: PassphraseOption = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's ClientApp API (one per device).")
    ] = 9094,
    min_events: Annotated[int, typer.Option(help="Train only with this many known events.")] = 3,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="The user's own ε budget, below the federation's.")
    ] = None,
    only_when: Annotated[
        str | None,
        typer.Option(help="Train only when this command exits 0 (e.g. on_ac_power)."),
    ] = None,
    foundation: Annotated[
        Path | None,
        typer.Option(
            help="The frozen public folder the federation builds on (a copy of the server's): "
            "the LLM recommender's foundation, or a ranker federation's retrieval bundle."
        ),
    ] = None,
    allow_without_dp: Annotated[
        bool,
        typer.Option(
            help="Train also when the federation sets no record-level DP (the ranker's): the "
            "update then has no ε bound against the server."
        ),
    ] = False,
) -> None:
    """Join the federation: a Flower SuperNode over TLS, authenticated by --auth-key, whose
    ClientApp reads only this store. Runs until stopped (Ctrl-C)."""
    from clients.join import supernode_command
    from fedrec.federation.runtime import deployment_env

    node_config = _node_config(store, key_file, passphrase_env)
    node_config["min-events"] = min_events
    if epsilon_budget is not None:
        node_config["epsilon-budget"] = epsilon_budget
    if only_when:
        node_config["only-when"] = only_when
    if foundation is not None:
        node_config["foundation"] = str(foundation.resolve())
    if allow_without_dp:
        node_config["allow-without-dp"] = True
    try:
        with _open(store, key_file, passphrase_env):
            pass  # the key opens the store before anything starts
        command = supernode_command(superlink, root_cert, auth_key, port, node_config)
    except (ValueError, OSError) as err:
        _fail(err)
        return
    env = deployment_env(store.resolve().parent / f".{store.name}-flwr")
    sys.exit(subprocess.call(command, env=env))
