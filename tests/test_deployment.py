"""Deployment on loopback with Flower's own processes: a SuperLink, two SuperNodes, `flwr run`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from fedrec.config import load_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.federated_models import initial_federated_model
from fedrec.population import population_of
from server.certs import make_credentials
from server.deploy import Credentials, superlink_command, write_flwr_settings

from .processes import deploy_on_loopback, flower_processes, free_ports, python, wait_for
from .tiny import TINY_LLM

HSTU = {
    "model": {"name": "hstu", "max_len": 12, "embedding_dim": 16, "num_blocks": 1},
    "federated": {"central_dp": {"noise_multiplier": 0.1, "clipping_norm": 1.0}},
}
LLM = {  # the LLM recommender: foundation on the server, DP-SGD on LoRA + prompts on the nodes
    **TINY_LLM,
    "federated": {"record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
}


def _devices(
    tmp_path: Path, users: int, sections: dict, federated: dict, nodes: int
) -> tuple[Path, Path, list[Path]]:
    """The run's config (synthetic data of ``users`` users in ``nodes`` silos, two rounds)
    and one folder per device: each holds only its own events (its store) and gets its own
    ledger and personal prompt there; the item catalogue reaches it from the server in the
    run. Returns (config, run folder, device folders)."""
    run_dir = tmp_path / "run"
    config = tmp_path / "deploy.yaml"
    data = {
        "seed": 0,
        "output_dir": str(run_dir),
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": users, "num_items": 30, "mean_length": 12, "seed": 0},
        },
        "evaluation": {"ks": [10]},
        **sections,
        "federated": {
            "partitioning": "hash",
            "num_partitions": nodes,
            "num_rounds": 2,
            "clients_per_round": nodes,
            **federated,
        },
    }
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    population = population_of(load_config(config))
    devices = [tmp_path / f"device-{partition}" for partition in range(nodes)]
    for partition, device in enumerate(devices):
        population.write_store(device / "store", partition)
    return config, run_dir, devices


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["hstu", "llm"])
def test_two_supernodes_on_loopback_run_two_rounds_and_every_process_is_stopped(tmp_path, kind):
    extra = HSTU if kind == "hstu" else LLM
    sections = {k: v for k, v in extra.items() if k != "federated"}
    config, run_dir, devices = _devices(tmp_path, 10, sections, extra["federated"], nodes=2)
    deploy_on_loopback(tmp_path, config, run_dir, devices)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds"] == 2 and results["clients"] == 2 and not results["failed"]
    assert not (run_dir / "client-stores").exists()  # the server wrote no client data
    published = (run_dir / "catalogue.json").read_text()
    for device in devices:  # each device received the run's catalogue and kept it
        assert (device / "catalogue.json").read_text() == published
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["clients"] == 2 for h in history)
    report = json.loads((run_dir / "privacy.json").read_text())
    if kind == "hstu":
        assert sorted(report["federation"]["epsilon_by_round"]) == ["1", "2"]
        assert report["federation"]["unit"] == ["user"]
        return
    # LLM: only adapters were sent (the checkpoint holds what the server sends), each node kept
    # its personal prompt in its own folder, and spent record-level DP.
    sent = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert sent and all(k.startswith(("lora.", "scenario.")) for k in sent)
    assert report["units"].keys() == {"user-within-silo"}
    for partition, device in enumerate(devices):
        assert (device / f"client-{partition}-personal.safetensors").exists()
        assert json.loads((device / f"client-{partition}.json").read_text())["events"]
    assert not (run_dir / "client-state").exists() and not (run_dir / "devices").exists()
    assert (run_dir / "global" / "lora" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secagg_on_five_supernodes_survives_two_dropping_out_every_round(tmp_path):
    """SecAgg+ with distributed DP noise over Flower's deployment runtime. In each round the
    drop-out setting makes 30 % of the clients (2 of 5, chosen anew each round) fail after the
    keys were shared; the other three masked updates are unmasked with the dropped clients'
    secrets rebuilt from shares, and the model moves."""
    secure = {
        "central_dp": {"noise_multiplier": 0.1, "clipping_norm": 1.0, "sampling": "fixed"},
        "secure_aggregation": {
            "num_shares": 5,
            "reconstruction_threshold": 3,
            "min_contributors": 3,
        },
    }
    sections = {"audit": {"enabled": False}, "model": HSTU["model"]}
    config, run_dir, devices = _devices(tmp_path, 20, sections, secure, nodes=5)
    deploy_on_loopback(tmp_path, config, run_dir, devices, "secagg-drop-out=0.3", timeout=600)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds"] == 2 and not results["failed"]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [h["train"] for h in history]
    assert [t["secagg-dropped"] for t in trained] == [2, 2]
    assert [t["dp-replies"] for t in trained] == [3, 3]
    final = torch.load(run_dir / "model.pt", weights_only=True)
    catalogue = ItemCatalogue.load(run_dir / "catalogue.json")
    initial = initial_federated_model(load_config(config), catalogue, run_dir).shared_state()
    assert sum(float((final[k] - v).abs().sum()) for k, v in initial.items()) > 0
    report = json.loads((run_dir / "privacy.json").read_text())
    assert sorted(report["federation"]["epsilon_by_round"]) == ["1", "2"]
    assert any("distributed noise" in text for text in report["not_covered"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tls_superlink_with_supernode_auth_admits_only_registered_nodes_with_the_ca(tmp_path):
    """With `fedrec certs`' files: the SuperLink serves TLS and SuperNode authentication; a
    device registered with `flwr supernode register` is activated; an unregistered key, a node
    without the CA certificate and a plaintext (`--insecure`) node are each refused, as each
    one's log and the SuperLink's say."""
    pki = make_credentials(tmp_path / "pki", ["127.0.0.1"], ["registered", "unknown"])
    binaries = Path(python()).parent
    link, *ports = free_ports(5)
    with flower_processes(tmp_path) as (env, start):
        # the flwr CLI's settings where this test's FLWR_HOME is, and `fedrec server start`'s
        # SuperLink command line
        assert write_flwr_settings(tmp_path, f"127.0.0.1:{link}", pki.ca_cert) == Path(
            env["FLWR_HOME"]
        )
        superlink = start(
            superlink_command(Credentials(pki.ca_cert.parent), "127.0.0.1", link, tmp_path),
            "superlink.log",
        )
        link_log = tmp_path / "superlink.log"
        wait_for(
            lambda: "Uvicorn running on https" in link_log.read_text(errors="replace"),
            timeout=120,
            what="the TLS SuperLink",
            log=link_log,
            watch=(superlink,),
        )
        public = pki.device_keys["registered"].with_name("registered.pub")
        register = start([str(binaries / "flwr"), "supernode", "register", str(public)], "reg.log")
        assert register.wait(timeout=120) == 0, (tmp_path / "reg.log").read_text()

        def node(name: str, port: int, *flags: str) -> None:
            start(
                [
                    str(binaries / "flower-supernode"),
                    *flags,
                    *("--superlink", f"127.0.0.1:{link}", "--port", str(port)),
                    *("--node-config", "partition-id=0 num-partitions=1"),
                ],
                f"{name}.log",
            )

        ca = ("--root-certificates", str(pki.ca_cert))
        node(
            "registered",
            ports[0],
            *ca,
            "--auth-supernode-private-key",
            str(pki.device_keys["registered"]),
        )
        node(
            "unknown",
            ports[1],
            *ca,
            "--auth-supernode-private-key",
            str(pki.device_keys["unknown"]),
        )
        node("no-ca", ports[2], "--auth-supernode-private-key", str(pki.device_keys["registered"]))
        node("plaintext", ports[3], "--insecure")

        def said(name: str, text: str) -> Callable[[], bool]:
            return lambda: text in (tmp_path / f"{name}.log").read_text(errors="replace")

        for what, condition in (
            ("the registered node activated", said("superlink", "Activated node_id")),
            ("the unknown key refused", said("unknown", "Failed to activate SuperNode")),
            ("the node without the CA refused", said("no-ca", "CERTIFICATE_VERIFY_FAILED")),
            ("the plaintext node refused", said("plaintext", "Connection attempt failed")),
        ):
            wait_for(condition, timeout=120, what=what, log=link_log, watch=(superlink,))
        # Only the registered node ever got in.
        assert link_log.read_text(errors="replace").count("Activated node_id") == 1
