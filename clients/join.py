"""A device joins a deployment: a Flower SuperNode over TLS, authenticated by the device's key,
whose ClientApp reads only the device's encrypted store (``clients.device``)."""

from __future__ import annotations

from pathlib import Path

from fedrec.federation.runtime import flower_binary


def supernode_command(
    superlink: str,
    root_cert: Path,
    auth_key: Path,
    port: int,
    node_config: dict[str, str | int | float],
) -> list[str]:
    """``flower-supernode`` reaching ``superlink`` over TLS (trusting ``root_cert``),
    authenticated by ``auth_key``, its ClientApp API on 127.0.0.1:``port``, running the
    ClientApp with ``node_config`` (the store and how to open it)."""
    for path, what in ((root_cert, "the CA certificate"), (auth_key, "the device's auth key")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {what} is missing (fedrec certs makes it)")
    quoted = [k for k, v in node_config.items() if "'" in str(v) or '"' in str(v)]
    if quoted:
        raise ValueError(f"node config {quoted}: a path or value with a quote cannot be passed")
    settings = " ".join(
        f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items()
    )
    return [
        flower_binary("flower-supernode"),
        *("--superlink", superlink),
        *("--root-certificates", str(root_cert.resolve())),
        *("--auth-supernode-private-key", str(auth_key.resolve())),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--node-config", settings),
    ]
