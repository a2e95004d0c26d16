"""Signal against noise in user-level DP-FedAvg: the norm of a round's mean clipped update
against the norm of the Gaussian noise the server adds to it, for each target ε.

    python simulations/signal_to_noise.py --config configs/ml-100k-federated-fedadam.yaml \
        --rounds 400 --clip 10 --epsilons 1 2 4 8 --model runs/fedsgd-final-s0/model.pt \
        --output runs/snr-ml100k

For a cohort of the expected size (clients per round, drawn at random from the population) it
computes every client's FedSGD update at the given global model (``--model``, else the
config's seeded initial model) with the vectorised client round, clips each to ``--clip`` and
takes their mean m. The server releases m + N(0, (σC / cohort)² I) over the P shared
parameters, so the noise norm is ≈ σ·C·√P / cohort, with σ solved by Opacus (RDP) for Poisson
sampling at q = cohort / population over ``--rounds`` rounds and δ = min(1e-5, N^-1.1), as
``privacy_utility.py`` and the server do. A ratio ‖m‖ / noise well below 1 means a round's
release is mostly noise (the server optimizer averages over rounds, so a run tolerates a
per-round ratio somewhat below 1, not far below).

This is an offline diagnostic on the simulation's whole population: the un-noised mean is
exactly what DP keeps from the server, so no run ever logs it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from fedrec.config import parse_config
from fedrec.federated_models import initial_federated_model
from fedrec.federation import CentralDPConfig
from fedrec.federation.config import FederatedConfig
from fedrec.federation.model import FederatedModel
from fedrec.federation.privacy import client_seed
from fedrec.federation.vectorised import batched_fedsgd_steps, why_not_vectorised
from fedrec.population import population_of
from simulations.privacy_utility import user_level_sigma


def mean_clipped_update(
    model: FederatedModel,
    splits: list,
    fed: FederatedConfig,
    clip: float,
    seed: int,
) -> tuple[np.ndarray, list[float]]:
    """The mean of the clients' clipped FedSGD updates (flattened) and their raw norms."""
    why_not = why_not_vectorised(model, fed)
    assert why_not is None, f"the clients' FedSGD steps cannot be batched: {why_not}"
    global_state = {k: v.detach().clone() for k, v in model.shared_state().items()}
    trained = batched_fedsgd_steps(
        model, splits, fed, [client_seed(seed, 1, i) for i in range(len(splits))]
    )
    assert trained is not None, "every client must hold one user (and, for the LLM, one record)"
    total = torch.zeros(sum(v.numel() for v in global_state.values()), dtype=torch.float64)
    norms = []
    for state, _ in trained:
        update = torch.cat([(state[k] - global_state[k]).flatten() for k in global_state])
        norm = float(update.norm())
        norms.append(norm)
        total += update.double() * min(1.0, clip / norm if norm > 0 else 1.0)
    return (total / len(splits)).numpy(), norms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment YAML (partitioning: user)")
    parser.add_argument("--rounds", type=int, required=True, help="rounds the σ is solved for")
    parser.add_argument("--clip", type=float, required=True, help="user-level clipping norm C")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--model", help="a run's model.pt (default: the initial model)")
    parser.add_argument("--clients-per-round", type=int, help="override the cohort size")
    parser.add_argument("--output", required=True, help="folder for snr.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    if args.clients_per_round:
        data["federated"]["clients_per_round"] = args.clients_per_round
    config = parse_config(data, args.config)
    population = population_of(config)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model = initial_federated_model(config, population.publish(output), output)
    if args.model:
        model.load_shared_state(torch.load(args.model, weights_only=True))
    clients = len(population.partitions)
    cohort = min(config.federated.clients_per_round, clients)
    rng = np.random.default_rng(config.seed)
    chosen = rng.choice(clients, size=cohort, replace=False)
    splits = [population.split.subset(population.partitions[c]) for c in chosen]
    mean, norms = mean_clipped_update(model, splits, config.federated, args.clip, config.seed)
    params = mean.size
    delta = CentralDPConfig().delta_for(clients)
    rows = []
    for eps in args.epsilons:
        sigma = user_level_sigma(eps, delta, cohort / clients, args.rounds)
        noise = sigma * args.clip * math.sqrt(params) / cohort
        rows.append(
            {
                "target_epsilon": eps,
                "sigma": sigma,
                "noise_norm": noise,
                "signal_to_noise": float(np.linalg.norm(mean)) / noise,
            }
        )
    result = {
        "config": args.config,
        "model": args.model or "initial",
        "clients": clients,
        "cohort": cohort,
        "rounds": args.rounds,
        "delta": delta,
        "parameters": params,
        "clip": args.clip,
        "update_norm_median": float(np.median(norms)),
        "clipped_fraction": float(np.mean(np.array(norms) > args.clip)),
        "mean_clipped_update_norm": float(np.linalg.norm(mean)),
        "rows": rows,
    }
    (output / "snr.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
