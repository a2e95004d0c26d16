"""The reference rows of a federation's table, on the users its rounds are evaluated on
(``evaluation.sample_users``, else all): popularity, and the global model before any round
(for the LLM recommender: its foundation with fresh adapters).

    python simulations/references.py --config configs/ml-100k-catalogue-100k-llm.yaml \
        --output runs/refs-cat100k-llm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from fedrec.config import load_config
from fedrec.evaluation import evaluate, evaluation_users, popularity_scorer
from fedrec.federated_models import initial_federated_model
from fedrec.population import population_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment YAML with a federated: part")
    parser.add_argument("--output", required=True, help="folder for references.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config)
    population = population_of(config)
    split, evaluation = population.split, config.evaluation
    users = evaluation_users(split, evaluation)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model = initial_federated_model(config, population.publish(output), output)
    result: dict[str, object] = {
        "config": args.config,
        "users": split.num_users if users is None else len(users),
    }
    scorers = {
        "popularity": popularity_scorer(split),
        "initial_model": model.scorer(split, torch.device("cpu")),
    }
    for name, scorer in scorers.items():
        started = time.perf_counter()
        result[name] = {
            stage: evaluate(scorer, split, stage, evaluation, users).metrics
            for stage in ("valid", "test")
        } | {"seconds": time.perf_counter() - started}
    (output / "references.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
