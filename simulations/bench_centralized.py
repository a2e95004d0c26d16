"""Centralized benchmark: popularity, SASRec and HSTU over several seeds, full-ranking test metrics.

    python simulations/bench_centralized.py --config configs/ml-100k-hstu.yaml \
        --config configs/ml-100k-sasrec.yaml --data-dir ../shared/data/ml-100k --seeds 0 1 2

Writes ``bench.json`` and ``bench.md`` (mean ± std over seeds, seconds per epoch) to --output.
Model selection is on validation only (early stopping inside each run); test is read once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from fedrec.config import load_config
from fedrec.data import prepare_split
from fedrec.evaluation import evaluate, popularity_scorer
from fedrec.experiment import environment, run_centralized

METRICS = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR", "Coverage@10")


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", required=True, help="experiment YAML (repeatable)"
    )
    parser.add_argument("--data-dir", help="overrides data.path of every config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/bench", help="folder for runs and the summary")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (overrides train.device)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="override train.epochs (smoke runs)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (train.num_threads)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    popularity: dict[str, float] | None = None
    started = time.perf_counter()
    for config_path in args.config:
        base = load_config(config_path)
        if args.data_dir:
            base.data.path = args.data_dir
        overrides = {
            k: v
            for k, v in (
                ("device", args.device),
                ("epochs", args.epochs),
                ("num_threads", args.threads),
            )
            if v
        }
        base.train = dataclasses.replace(base.train, progress=False, **overrides)
        if popularity is None:
            _, split = prepare_split(base.data)
            popularity = evaluate(popularity_scorer(split), split, "test", base.evaluation).metrics
        label = f"{base.model_name} ({Path(config_path).stem})"
        for seed in args.seeds:
            base.seed = seed
            result = run_centralized(base, output / f"{Path(config_path).stem}-seed{seed}")
            rows.setdefault(label, []).append(result)
            print(
                f"{label} seed {seed}: test NDCG@10 {result['test']['NDCG@10']:.4f} HR@10 "
                f"{result['test']['HR@10']:.4f}  best epoch {result['best_epoch']}  "
                f"{result['seconds_per_epoch']:.2f} s/epoch",
                flush=True,
            )
    assert popularity is not None
    lines = [
        "| model | " + " | ".join(METRICS) + " | s/epoch (median) | best epoch |",
        "|---" * (len(METRICS) + 3) + "|",
        "| popularity | " + " | ".join(f"{popularity[m]:.4f}" for m in METRICS) + " | – | – |",
    ]
    summary: dict[str, dict] = {"popularity": {"test": popularity}}
    for label, results in rows.items():
        cells = [mean_std([r["test"][m] for r in results]) for m in METRICS]
        seconds = statistics.median(r["seconds_per_epoch"] for r in results)
        epochs = ", ".join(str(r["best_epoch"]) for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.2f} | {epochs} |")
        summary[label] = {
            "seeds": args.seeds,
            "test": {m: [r["test"][m] for r in results] for m in METRICS},
            "valid": {
                m: [r["valid"][m] for r in results] for m in METRICS if m in results[0]["valid"]
            },
            "seconds_per_epoch": [r["seconds_per_epoch"] for r in results],
            "best_epoch": [r["best_epoch"] for r in results],
        }
    table = "\n".join(lines)
    print(table)
    summary["environment"] = environment()
    summary["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    summary["wall_seconds"] = time.perf_counter() - started
    (output / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "bench.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
