"""Deployment on loopback with Flower's own processes: a SuperLink, two SuperNodes, `flwr run`."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml

from fedrec.config import load_config
from fedrec.population import population_of

from .processes import REPO, flower_processes, python, wait_for


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _bin(name: str) -> str:
    return str(Path(python()).parent / name)


HSTU = {
    "model": {"name": "hstu", "max_len": 12, "embedding_dim": 16, "num_blocks": 1},
    "federated": {"central_dp": {"noise_multiplier": 0.1, "clipping_norm": 1.0}},
}
LLM = {  # the LLM recommender: foundation on the server, DP-SGD on LoRA + prompts on the nodes
    "audit": {"enabled": False},
    "semantic_id": {"content": {"dim": 8}, "rqvae": {"levels": 2, "codebook_size": 4}},
    "llm": {
        "backbone": {
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 32,
            "text_vocab": 120,
        },
        "foundation": {"epochs": 1},
        "max_items": 4,
        "prompts": {"scenario_tokens": 2, "personal_tokens": 2},
        "beam_width": 10,
    },
    "federated": {"record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["hstu", "llm"])
def test_two_supernodes_on_loopback_run_two_rounds_and_every_process_is_stopped(tmp_path, kind):
    run_dir = tmp_path / "run"
    config = tmp_path / "deploy.yaml"
    extra = HSTU if kind == "hstu" else LLM
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "output_dir": str(run_dir),
                "data": {
                    "source": "synthetic",
                    "synthetic": {"num_users": 10, "num_items": 30, "mean_length": 12, "seed": 0},
                },
                "evaluation": {"ks": [10]},
                **{k: v for k, v in extra.items() if k != "federated"},
                "federated": {
                    "partitioning": "hash",
                    "num_partitions": 2,
                    "num_rounds": 2,
                    "clients_per_round": 2,
                    **extra["federated"],
                },
            }
        ),
        encoding="utf-8",
    )
    # Each device holds only its own events (its store) and its own folder for the ledger and
    # the personal prompt; the item catalogue reaches it from the server in the run.
    population = population_of(load_config(config))
    devices = [tmp_path / f"device-{partition}" for partition in (0, 1)]
    for partition, device in enumerate(devices):
        population.write_store(device / "store", partition)
    # Flower 1.42 serves the Runtime, Control and Fleet APIs over HTTP on one port.
    link, node0, node1 = _free_ports(3)
    with flower_processes(tmp_path) as (env, start):
        flwr_home = Path(env["FLWR_HOME"])
        flwr_home.mkdir(parents=True)
        (flwr_home / "config.toml").write_text(
            "[superlink]\n"
            'default = "loopback"\n\n'
            "[superlink.loopback]\n"
            f'address = "127.0.0.1:{link}"\n'
            "insecure = true\n",
            encoding="utf-8",
        )
        superlink = start(
            [
                _bin("flower-superlink"),
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
                    _bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={partition} num-partitions=2 store='{device / 'store'}' "
                    f"catalogue='{device / 'catalogue.json'}' ledger-dir='{device}'",
                ],
                f"supernode-{partition}.log",
            )
            for partition, (port, device) in enumerate(zip((node0, node1), devices, strict=True))
        ]
        run_config = f"config='{config}' run-dir='{run_dir}' deployment=true"
        start(
            [_bin("flwr"), "run", str(REPO), "loopback", "--run-config", run_config, "--stream"],
            "flwr-run.log",
        )
        wait_for(
            lambda: (run_dir / "results.json").exists(),
            timeout=300,
            what="the deployed run's results.json",
            log=tmp_path / "superlink.log",
            watch=(superlink, *nodes),
        )
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
