"""Federated benchmarks, each measured side by side in one run (medians and ratios):

    python simulations/bench_federated.py dp-step   # DP-SGD step vs a non-private step
    python simulations/bench_federated.py round     # Flower simulation round vs in-process loop
    python simulations/bench_federated.py memory    # peak memory vs population size
    python simulations/bench_federated.py population-memory --config CONFIG
                                                    # the driver's population, stage by stage
    python simulations/bench_federated.py audit --config configs/ml-100k-federated-fedadam.yaml
                                                    # a round with vs without the audit

Results go to --output (JSON) and are summarised in BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `simulations` importable

from simulations.flower_env import flower_env  # noqa: E402


def bench_dp_step(repeats: int, steps: int, batch: int) -> dict[str, Any]:
    """Seconds per local step of HSTU (ML-100K-sized model) on ``batch`` windows of 20 events:
    plain Adam step vs DP-SGD by book-keeping (fedrec's default: tables as rows, linear layers'
    norms from their inputs and output gradients) and with Opacus' own hooks and functorch
    per-sample gradients."""
    from fedrec.data import SyntheticConfig, generate_synthetic, leave_one_out
    from fedrec.data.preprocess import PreprocessConfig, preprocess
    from fedrec.federation import event_windows
    from fedrec.models import build_model
    from fedrec.models.hstu import HSTUConfig
    from fedrec.privacy.dp_sgd import DPSGDConfig, dp_train
    from fedrec.training import trainable_users

    torch.set_num_threads(1)
    split = leave_one_out(
        preprocess(
            generate_synthetic(SyntheticConfig(num_users=60, num_items=1682, mean_length=60)),
            PreprocessConfig(),
        )
    )
    windows = event_windows(split, trainable_users(split), 20)
    config = HSTUConfig(max_len=20, embedding_dim=50, num_blocks=2, dropout=0.2)
    records = len(windows)
    timings: dict[str, list[float]] = {"plain": [], "bookkeeping": [], "hooks": [], "functorch": []}
    for _ in range(repeats):
        for mode in timings:
            torch.manual_seed(0)
            model = build_model("hstu", split.num_items, config)
            started = time.perf_counter()
            if mode == "plain":
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                model.train()
                for step in range(steps):
                    lo = (step * batch) % max(records - batch, 1)
                    items, times, targets = windows[lo : lo + batch]
                    loss = model.loss(items, times, targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                done = steps
            else:
                dp = DPSGDConfig(noise_multiplier=1.0, batch_size=batch, grad_sample_mode=mode)
                epochs = max(1, round(steps * batch / records))
                done = dp_train(model, windows, dp, epochs, 1e-3).steps
            timings[mode].append((time.perf_counter() - started) / done)
    medians = {mode: statistics.median(values) for mode, values in timings.items()}
    return {
        "records": records,
        "batch_size": batch,
        "seconds_per_step": medians,
        "ratio_vs_plain": {m: medians[m] / medians["plain"] for m in timings if m != "plain"},
        "repeats": repeats,
    }


def _tree_memory(root: int) -> tuple[int, int, dict[str, int]]:
    """Resident bytes of ``root`` and every descendant (Ray actors included): the sum of their
    RSS, and of their PSS, and the PSS of each process by name (``comm``, numbered when
    repeated). RSS counts a shared page in every process that maps it (libtorch, and Ray's
    object store, which the driver, the raylet and each actor map); PSS splits it among them,
    so the PSS sum is the tree's physical memory."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
    rss = pss = 0
    by_process: dict[str, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                own = int(line.split()[1]) * 1024
                pss += own
                repeats = sum(1 for key in by_process if key.split(" #")[0] == name)
                by_process[f"{name} #{repeats + 1}" if repeats else name] = own
    return rss, pss, by_process


def _simulate(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run `fedrec simulate` on ``config``; return its metrics and the peak tree RSS."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    config = {**config, "output_dir": str(workdir / "run")}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = flower_env(workdir)
    started = time.perf_counter()
    with (workdir / "log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrec.cli", "simulate", "-c", str(path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak_rss = peak_pss = 0
        at_peak: dict[str, int] = {}
        while proc.poll() is None:
            rss, pss, by_process = _tree_memory(proc.pid)
            peak_rss = max(peak_rss, rss)
            if pss > peak_pss:
                peak_pss, at_peak = pss, by_process
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed, see {workdir / 'log'}")
    history = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").open()]
    return {
        "history": history,
        "peak_rss_bytes": peak_rss,
        "peak_pss_bytes": peak_pss,
        "pss_mib_by_process_at_peak": {k: v / 2**20 for k, v in sorted(at_peak.items())},
        "wall": time.perf_counter() - started,
    }


def synthetic_config(users: int, clients_per_round: int, rounds: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": users, "num_items": 300, "mean_length": 30, "seed": 0},
        },
        "model": {"name": "hstu", "max_len": 30, "embedding_dim": 32},
        "evaluation": {"ks": [10]},
        "federated": {
            "partitioning": "user",
            "num_rounds": rounds,
            "clients_per_round": clients_per_round,
            "local_epochs": 2,
            "local_learning_rate": 0.005,
        },
    }


def bench_round(
    workdir: Path,
    clients_per_round: int,
    rounds: int,
    config_path: str | None = None,
    users_per_node: int = 1,
) -> dict[str, Any]:
    """Median seconds per round (sampling → aggregation, evaluation excluded; round 1 with
    actor start-up excluded) of the Flower simulation (``users_per_node`` clients per node:
    cohort nodes) and of the in-process loop, with one client per node and (the same
    training as Flower's) with ``users_per_node``, on a small synthetic
    workload or on ``config_path``'s federation (its local training, ``rounds`` rounds,
    ``clients_per_round``)."""
    from fedrec.config import parse_config
    from fedrec.population import population_of
    from simulations.inprocess import run_inprocess

    if config_path is None:
        config = synthetic_config(1000, clients_per_round, rounds)
    else:
        config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        config["federated"].update(num_rounds=rounds, clients_per_round=clients_per_round)
    flower_config = {
        **config,
        "federated": {**config["federated"], "users_per_node": users_per_node},
    }
    flower = _simulate(flower_config, workdir / "flower")["history"]
    torch.set_num_threads(1)
    engines = {"flower": flower[1:]}
    inprocess = [("inprocess_per_client", 1)]
    if users_per_node > 1:
        inprocess.append(("inprocess_same", users_per_node))
    for name, nodes in inprocess:
        folder = workdir / name
        parsed = parse_config(
            {
                **config,
                "federated": {**config["federated"], "users_per_node": nodes},
                "output_dir": str(folder),
            }
        )
        run_inprocess(population_of(parsed), folder, eval_every=rounds, progress=False)
        engines[name] = [json.loads(line) for line in (folder / "metrics.jsonl").open()][1:]
    seconds = {
        name: statistics.median(h["seconds"] for h in runs) for name, runs in engines.items()
    }
    same = seconds.get("inprocess_same", seconds["inprocess_per_client"])
    return {
        "config": config_path or "synthetic 1000 users, HSTU d=32, 2 local epochs",
        "clients_per_round": clients_per_round,
        "users_per_node": users_per_node,
        "rounds": rounds,
        "seconds_per_round": seconds,
        # the same training in both engines: cohort nodes in process too when users_per_node > 1
        "ratio_flower_to_inprocess_same_training": seconds["flower"] / same,
        "flower_first_round_seconds": flower[0]["seconds"],
    }


def bench_memory(
    workdir: Path,
    populations: list[int],
    clients_per_round: int,
    config_path: str | None = None,
    users_per_node: int = 1,
) -> dict[str, Any]:
    """Peak resident memory (RSS and PSS sums) of the whole simulation (driver + Ray actors),
    2 rounds each, of the small synthetic workload or of ``config_path``'s federation with its
    population set to each of ``populations`` (``users_per_node`` clients per node)."""
    out = {}
    for users in populations:
        if config_path is None:
            config = synthetic_config(users, clients_per_round, 2)
        else:
            config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
            config["data"]["synthetic"]["num_users"] = users
            config["federated"].update(num_rounds=2, clients_per_round=clients_per_round)
        config["federated"]["users_per_node"] = users_per_node
        result = _simulate(config, workdir / f"pop-{users}")
        out[str(users)] = {
            "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
            "peak_pss_mib": result["peak_pss_bytes"] / 2**20,
            "pss_mib_by_process_at_peak": result["pss_mib_by_process_at_peak"],
            "wall_seconds": result["wall"],
            "round_seconds": [h["seconds"] for h in result["history"]],
        }
    return {
        "config": config_path or "synthetic, HSTU d=32, 2 local epochs",
        "clients_per_round": clients_per_round,
        "users_per_node": users_per_node,
        "populations": out,
    }


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if "VmRSS" in line)


def _population_stages(config: dict[str, Any], folder: str) -> dict[str, Any]:
    """In a fresh process: resident MiB added by each stage of building ``config``'s
    population (what a simulation's driver holds), and the bytes of its arrays."""
    import gc

    from fedrec.config import load_config
    from fedrec.population import population_of

    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = load_config(path)
    start = _rss_mib()
    population = population_of(loaded)
    gc.collect()
    data = _rss_mib()
    groups = population.audit_context.groups
    gc.collect()
    audit = _rss_mib()
    arrays: dict[str, float] = {}
    counted: set[int] = set()  # an array the split shares with the data set counts once
    for owner, obj in (("dataset", population.dataset), ("split", population.split)):
        for name, value in vars(obj).items():
            if hasattr(value, "nbytes") and id(value) not in counted:
                counted.add(id(value))
                arrays[f"{owner}.{name}"] = value.nbytes / 2**20
    return {
        "users": population.split.num_users,
        "clients": len(population.partitions),
        "events": int(population.split.offsets[-1]),
        "mib_after_imports": start,
        "mib_data_split_partitions": data - start,
        "mib_audit_context": audit - data,
        "audit_groups": sorted(groups),
        "array_mib": arrays,
    }


def bench_population_memory(
    config_path: str, populations: list[int], workdir: Path
) -> dict[str, Any]:
    """The driver's population at each size of ``populations``, each in a fresh process."""
    import multiprocessing

    out = {}
    for users in populations:
        config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        config["data"]["synthetic"]["num_users"] = users
        folder = workdir / f"pop-{users}"
        folder.mkdir(parents=True, exist_ok=True)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            out[str(users)] = pool.apply(_population_stages, (config, str(folder)))
    return {"config": config_path, "populations": out}


def bench_audit(config_path: str, workdir: Path, rounds: int, repeats: int) -> dict[str, Any]:
    """Wall seconds per round (local training, aggregation, full-ranking evaluation every round)
    of the in-process loop with the server-side audit off and on, alternated ``repeats`` times."""
    import dataclasses

    from fedrec.config import load_config
    from fedrec.population import population_of
    from simulations.inprocess import run_inprocess

    torch.set_num_threads(1)
    base = load_config(config_path)
    base.federated = dataclasses.replace(base.federated, num_rounds=rounds)
    population = population_of(base)
    per_round: dict[str, list[float]] = {"off": [], "on": []}
    audit_seconds: list[float] = []
    for repeat in range(repeats):
        for mode in ("off", "on"):
            population.config.audit = dataclasses.replace(base.audit, enabled=mode == "on")
            run_dir = workdir / f"{mode}-{repeat}"
            started = time.perf_counter()
            run_inprocess(population, run_dir, eval_every=1, progress=False)
            per_round[mode].append((time.perf_counter() - started) / rounds)
            if mode == "on":
                audit_seconds += [
                    json.loads(line)["seconds"] for line in (run_dir / "audit.jsonl").open()
                ]
    off, on = statistics.median(per_round["off"]), statistics.median(per_round["on"])
    return {
        "config": config_path,
        "rounds": rounds,
        "repeats": repeats,
        "seconds_per_round_without_audit": off,
        "seconds_per_round_with_audit": on,
        "overhead": on / off - 1,
        "audit_seconds_median": statistics.median(audit_seconds),
        "runs": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what", choices=("dp-step", "round", "memory", "population-memory", "audit")
    )
    parser.add_argument(
        "--config",
        help="experiment YAML (audit, population-memory; optional for round and memory)",
    )
    parser.add_argument("--output", default="runs/bench-federated", help="folder for results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="dp-step: windows per (expected) batch"
    )
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--users-per-node",
        type=int,
        default=1,
        help="round, memory: clients per Flower node (cohort nodes)",
    )
    parser.add_argument("--populations", type=int, nargs="+", default=[1000, 10000, 100000])
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.what == "dp-step":
        result = bench_dp_step(args.repeats, args.steps, args.batch_size)
    elif args.what == "audit":
        if not args.config:
            parser.error("audit needs --config")
        result = bench_audit(args.config, output / "audit", args.rounds, args.repeats)
    elif args.what == "population-memory":
        if not args.config:
            parser.error("population-memory needs --config (a synthetic population)")
        result = bench_population_memory(args.config, args.populations, output / "population")
    elif args.what == "round":
        result = bench_round(
            output / "round", args.clients_per_round, args.rounds, args.config, args.users_per_node
        )
    else:
        result = bench_memory(
            output / "memory",
            args.populations,
            args.clients_per_round,
            args.config,
            args.users_per_node,
        )
    result["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__}
    (output / f"{args.what}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
