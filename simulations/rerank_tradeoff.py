"""Accuracy vs calibration and long-tail exposure of the re-rankers, for several λ.

    python simulations/rerank_tradeoff.py --config configs/ml-100k-federated-fedadam.yaml \
        --model runs/flower-ml100k-fedsgd/checkpoint.pt --output runs/rerank-ml100k

Loads a trained global model (a run's ``checkpoint.pt`` or a bare state dict), ranks every
user's held-out test item, re-ranks each top-N with the calibrated (Steck) and the long-tail
(personalised xQuAD) re-ranker at each λ, and writes ``tradeoff.json``, ``tradeoff.md`` (the
table for BENCHMARKS.md) and ``tradeoff.png``. λ = 0 is the model's own ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.audits import AuditContext, RerankConfig, audit
from fedrec.config import load_config
from fedrec.data import prepare_split
from fedrec.files import load_checkpoint
from fedrec.models import build_model
from fedrec.plots import pyplot
from fedrec.training import model_scorer


def tradeoff(
    config_path: str,
    model_path: Path,
    methods: list[str],
    lambdas: list[float],
    top_n: int,
    stage: str,
) -> list[dict[str, Any]]:
    config = load_config(config_path)
    config.audit = dataclasses.replace(config.audit, stage=stage)
    dataset, split = prepare_split(config.data)
    model = build_model(config.model_name, split.num_items, config.model)
    state = load_checkpoint(Path(model_path))
    model.load_state_dict(state.get("model", state))
    scorer = model_scorer(model, split, torch.device("cpu"))
    rows = []
    for method in methods:
        for lam in lambdas:
            audit_config = dataclasses.replace(
                config.audit, rerank=RerankConfig(method=method, lam=lam, top_n=top_n)
            )
            context = AuditContext.build(dataset, split, audit_config)
            started = time.perf_counter()
            result = context.evaluate(scorer, audit_config, config.evaluation)
            seconds = time.perf_counter() - started
            record = audit(
                result.per_user, result.top_items, context, audit_config, np.random.default_rng(0)
            )
            rows.append(
                {
                    "method": method,
                    "lambda": lam,
                    "NDCG@10": result.metrics["NDCG@10"],
                    "HR@10": result.metrics["HR@10"],
                    "calibration_kl": record.get("calibration", {}).get("kl", float("nan")),
                    "aplt": record["items"]["aplt"],
                    "coverage@10": record["items"][f"coverage@{audit_config.k}"],
                    "arp": record["items"]["arp"],
                    "seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    base = {r["method"]: r for r in rows if r["lambda"] == 0}
    lines = [
        "| re-ranker | λ | NDCG@10 | Δ NDCG@10 | calibration KL | Δ KL | APLT | coverage@10 | ARP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["method"], r)
        lines.append(
            f"| {r['method']} | {r['lambda']:g} | {r['NDCG@10']:.4f} | "
            f"{r['NDCG@10'] / b['NDCG@10'] - 1:+.1%} | {r['calibration_kl']:.3f} | "
            f"{r['calibration_kl'] / b['calibration_kl'] - 1:+.1%} | {r['aplt']:.4f} | "
            f"{r['coverage@10']:.3f} | {r['arp']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        left.plot(
            [r["calibration_kl"] for r in mine], [r["NDCG@10"] for r in mine], "o-", label=method
        )
        right.plot([r["aplt"] for r in mine], [r["NDCG@10"] for r in mine], "o-", label=method)
        for r in mine:
            left.annotate(f"{r['lambda']:g}", (r["calibration_kl"], r["NDCG@10"]), fontsize=7)
            right.annotate(f"{r['lambda']:g}", (r["aplt"], r["NDCG@10"]), fontsize=7)
    left.set(
        xlabel="calibration KL (lower is better)", ylabel="NDCG@10", title="accuracy vs calibration"
    )
    right.set(
        xlabel="APLT (long-tail share of top-10)", ylabel="NDCG@10", title="accuracy vs long tail"
    )
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="the experiment YAML the model was trained with"
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint.pt or a state dict")
    parser.add_argument("--methods", nargs="+", default=["calibrated", "long-tail"])
    parser.add_argument(
        "--lambdas", nargs="+", type=float, default=[0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    )
    parser.add_argument("--top-n", type=int, default=100, help="candidates re-ranked per user")
    parser.add_argument(
        "--stage",
        choices=("valid", "test"),
        default="test",
        help="held-out items to measure on (choose λ on valid, report it on test)",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = tradeoff(args.config, args.model, args.methods, args.lambdas, args.top_n, args.stage)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "tradeoff.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    table = markdown(rows)
    (args.output / "tradeoff.md").write_text(table, encoding="utf-8")
    plot(rows, args.output / "tradeoff.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
