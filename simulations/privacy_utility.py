"""Privacy–utility table: test NDCG@10 against ε for record-level DP-SGD on every client
(one record = one day of a user) and for user-level DP-FedAvg, with the non-private
federation as the reference.

    python simulations/privacy_utility.py --config configs/ml-100k-federated.yaml \
        --rounds 60 --epsilons 1 3 8 --seeds 0 1 2 --output runs/pu-ml100k

Runs on the in-process loop (simulations/inprocess.py, checked against the Flower simulation
by tests/test_inprocess.py), because hundreds of rounds × 100–1000 clients per round through
Flower's runtime would cost ≈ 60 ms per client message on this machine.

- user-level: Poisson client sampling with q = clients per round / population; σ is solved
  with Opacus (RDP) so that ``rounds`` releases reach ε at the default δ = min(1e-5, N^-1.1);
  clip norm ``--clip``; noise N(0, (σC)²) on the sum of clipped updates, divided by the
  expected cohort, before the server step (``server.dp.UserLevelDP``).
- day-level: each client runs DP-SGD with σ = ``--record-sigma`` on its days (records) at
  δ = 1e-5 and refuses to train once its own ledger would pass ε (``record_epsilon_budget``).
- noise is private (OS entropy): two runs of a row differ; ε does not.
- ``--holdout F`` keeps a fraction F of the users out of training and runs ``fedrec
  privacy-audit``'s membership attack on every row (AUC of members vs held-out users, and the
  empirical ε lower bound against the row's claimed ε).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from opacus.accountants.utils import get_noise_multiplier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from fedrec.config import parse_config
from fedrec.federation import CentralDPConfig
from fedrec.federation.layout import DEVICE_DIR
from fedrec.population import population_of
from fedrec.privacy_audit import run_privacy_audit
from simulations.inprocess import run_inprocess


def _run(data: dict[str, Any], federated: dict[str, Any], out: Path) -> dict[str, Any]:
    config = parse_config({**data, "federated": {**data["federated"], **federated}})
    rounds = config.federated.num_rounds
    # Every row simulates new devices: the ledgers of an earlier run of the row go first.
    shutil.rmtree(out / DEVICE_DIR, ignore_errors=True)
    results = run_inprocess(population_of(config), out, eval_every=rounds, progress=True)
    final = results["final"]
    row: dict[str, Any] = {
        "test_ndcg10": final["test"]["NDCG@10"],
        "test_hr10": final["test"]["HR@10"],
        "epsilon": json.loads((out / "privacy.json").read_text()),
    }
    if config.privacy_audit.holdout_fraction > 0:
        membership = run_privacy_audit(out, progress=False)["membership"]
        row["audit_auc"] = membership["auc"]
        row["audit_auc_interval"] = membership["auc_interval"]
        row["audit_epsilon_lower"] = membership["bound"]["empirical_epsilon_lower"]
        row["audit_contradicts"] = membership["bound"]["contradicts"]
    return row


def user_level_sigma(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """σ of user-level DP-FedAvg so that ``rounds`` Poisson-sampled releases reach ``epsilon``
    at ``delta`` (Opacus RDP, as the server's ledger accounts them)."""
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant="rdp",
        )
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of test NDCG@10 (and of the audit's AUC when run), per kind and ε."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["target_epsilon"]), []).append(row)
    table = []
    for (kind, eps), group in groups.items():
        ndcg, ndcg_sd = _mean_sd([row["test_ndcg10"] for row in group])
        entry = {
            "kind": kind,
            "target_epsilon": eps,
            "seeds": len(group),
            "test_ndcg10_mean": ndcg,
            "test_ndcg10_sd": ndcg_sd,
        }
        if all("audit_auc" in row for row in group):
            auc, auc_sd = _mean_sd([row["audit_auc"] for row in group])
            entry |= {"audit_auc_mean": auc, "audit_auc_sd": auc_sd}
        table.append(entry)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--clients-per-round", type=int)
    parser.add_argument(
        "--users-per-node", type=int, help="cohort nodes (vectorised FedSGD when it applies)"
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--clip", type=float, default=1.0, help="DP-FedAvg clip norm")
    parser.add_argument("--record-sigma", type=float, default=1.0)
    parser.add_argument("--kinds", nargs="+", default=["none", "user", "day"])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (config seed) per row"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of users held out of training; > 0 runs the membership audit per row",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    data["federated"]["num_rounds"] = args.rounds
    if args.clients_per_round:
        data["federated"]["clients_per_round"] = args.clients_per_round
    if args.users_per_node:
        data["federated"]["users_per_node"] = args.users_per_node
    if args.holdout:
        data["privacy_audit"] = {**data.get("privacy_audit", {}), "holdout_fraction": args.holdout}
    population = population_of(parse_config(data))
    num_clients = len(population.partitions)
    sampled = min(data["federated"]["clients_per_round"], num_clients)
    delta = CentralDPConfig().delta_for(num_clients)
    output = Path(args.output)
    rows: list[dict[str, Any]] = []
    summary = output / "privacy_utility.json"
    for kind in args.kinds:
        for eps in [None] if kind == "none" else args.epsilons:
            if kind == "user":
                assert eps is not None
                sigma = user_level_sigma(eps, delta, sampled / num_clients, args.rounds)
                federated = {"central_dp": {"noise_multiplier": sigma, "clipping_norm": args.clip}}
            elif kind == "day":
                sigma = args.record_sigma
                federated = {
                    "record_dp": {"noise_multiplier": sigma},
                    "record_epsilon_budget": eps,
                }
            else:
                sigma, federated = 0.0, {}
            for seed in args.seeds:
                name = kind if eps is None else f"{kind}-eps{eps:g}"
                result = _run({**data, "seed": seed}, federated, output / f"{name}-seed{seed}")
                report = result.pop("epsilon")
                rows.append(
                    {
                        "kind": kind,
                        "target_epsilon": eps,
                        "seed": seed,
                        "sigma": sigma,
                        "sampling": "poisson" if kind == "user" else "fixed cohort",
                        "accountant": "opacus rdp" if kind != "none" else None,
                        "federation_epsilon": (report["federation"] or {}).get("epsilon"),
                        "client_epsilon_max": report["clients"]["epsilon_max"],
                        **result,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            summary.write_text(
                json.dumps(
                    {
                        "config": args.config,
                        "clients": num_clients,
                        "clients_per_round": sampled,
                        "rounds": args.rounds,
                        "delta_user_level": delta,
                        "rows": rows,
                        "table": _table(rows),
                    },
                    indent=2,
                ),
                encoding="utf-8",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
