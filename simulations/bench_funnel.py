"""The recommendation funnel on a trained sequential run (issue 18), measured side by side:

    python simulations/bench_funnel.py --run runs/ml-100k-hstu --seeds 0 1 2

- HSTU alone (full ranking, the run's own model), and the funnel without a ranker (must equal
  it when HSTU is the first source: the funnel's reference check at scale);
- recall@N of each retrieval source and of their union, on the test targets;
- the multi-task ranker trained on every user's validation position (candidates from the
  funnel's retrieval; the sequential model never trained on that position), its AUC per task
  on the test candidates, and the funnel's test NDCG@10 / HR@10 with it, per ranker seed.

Popularity is the training counts (what the catalogue publishes). Full ranking: every item the
user has not seen is a candidate of HSTU and popularity; the funnel's answer is its top-K.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrec.data import prepare_split  # noqa: E402
from fedrec.data.catalogue import ItemCatalogue  # noqa: E402
from fedrec.data.split import SequenceSplit, Stage, split_ratings  # noqa: E402
from fedrec.evaluation import EvalConfig, evaluate  # noqa: E402
from fedrec.evaluation.metrics import rank_metrics  # noqa: E402
from fedrec.models.ranking import RankingBatch, ranker_class  # noqa: E402
from fedrec.privacy_audit import load_model, run_config  # noqa: E402
from fedrec.serving.bundle import ModelBundle  # noqa: E402
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables  # noqa: E402
from fedrec.serving.funnel import Funnel, FunnelConfig, recall_at_n  # noqa: E402
from fedrec.serving.ranker import (  # noqa: E402
    candidate_labels,
    flatten_examples,
    ranker_scorer,
    sequential_user_vectors,
    train_ranker,
)
from fedrec.serving.sources import popularity_source, sequential_source  # noqa: E402
from fedrec.serving.store import write_serving_bundle  # noqa: E402
from fedrec.training import model_scorer  # noqa: E402


def funnel_metrics(
    funnel: Funnel, visible: SequenceSplit, attributes: np.ndarray, targets: np.ndarray
) -> tuple[dict[str, float], Any]:
    """NDCG/HR@10 of the funnel's top-K (a target outside it counts as a miss)."""
    result = funnel(visible, np.arange(visible.num_users), attributes)
    hit = result.items == targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, visible.num_items + 1)
    per_user = rank_metrics(torch.from_numpy(ranks), (10,))
    return {name: float(values.mean()) for name, values in per_user.items()}, result


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    positive, negative = scores[labels > 0], scores[labels == 0]
    if not len(positive) or not len(negative):
        return float("nan")
    order = np.argsort(np.concatenate([positive, negative]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    values = np.concatenate([positive, negative])
    for value in np.unique(values):  # average ranks of ties
        same = values == value
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return float(
        (ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
        / (len(positive) * len(negative))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a finished HSTU/SASRec run folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="ranker seeds")
    parser.add_argument("--retrieve-n", type=int, default=100, help="items per source")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--positions",
        type=int,
        default=1,
        help="ranker examples from each user's last P positions before the test item (1: the "
        "validation item only; more reach into what the sequential model trained on)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--like-weight", type=float, default=0.5)
    parser.add_argument("--output", type=Path, help="write the report here (JSON)")
    parser.add_argument(
        "--bundle-out",
        type=Path,
        help="write a serving bundle (the run's model, the last seed's ranker, the funnel) "
        "into this new folder, for `fedrec serve --bundle`",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    config = run_config(args.run)
    dataset, split = prepare_split(config.data)
    model = load_model(args.run, config, split.num_items)
    device = torch.device("cpu")
    counts = split.train_item_counts()
    catalogue = ItemCatalogue.from_dataset(dataset, popularity=counts)
    tables = FeatureTables.build(
        catalogue, {a: dataset.user_features.get(a, np.array([])).tolist() for a in USER_ATTRIBUTES}
    )
    attributes = tables.attributes(
        [
            {
                a: str(dataset.user_features[a][u])
                for a in USER_ATTRIBUTES
                if a in dataset.user_features
            }
            for u in range(split.num_users)
        ]
    )
    ratings = split_ratings(dataset)
    sources = {
        "hstu": sequential_source(model, args.retrieve_n, device),
        "popularity": popularity_source(counts, args.retrieve_n),
    }
    retrieval = FunnelConfig(sources=("hstu", "popularity"), retrieve_n=args.retrieve_n, rank=False)
    views = {stage: split.visible(stage) for stage in ("valid", "test")}
    stage_targets: dict[Stage, np.ndarray] = {s: split.targets(s) for s in ("valid", "test")}
    cut = {"valid": 2, "test": 1}

    def target_ratings(stage: Stage) -> np.ndarray | None:
        return None if ratings is None else ratings[split.offsets[1:] - cut[stage]]

    report: dict[str, Any] = {
        "run": str(args.run),
        "retrieve_n": args.retrieve_n,
        "positions": args.positions,
        "epochs": args.epochs,
    }
    eval_config = EvalConfig(ks=(10,))
    hstu = evaluate(model_scorer(model, split, device), split, "test", eval_config).metrics
    report["hstu_alone"] = {k: hstu[k] for k in ("NDCG@10", "HR@10")}
    plain = Funnel(retrieval, sources)
    plain_metrics, plain_result = funnel_metrics(
        plain, views["test"], attributes, stage_targets["test"]
    )
    report["funnel_without_ranker"] = plain_metrics
    names = dict(enumerate(retrieval.sources))
    recall = {
        names.get(int(k.split(":")[1]), k) if k.startswith("source:") else k: v
        for k, v in recall_at_n(plain_result.candidates, stage_targets["test"]).items()
    }
    report["recall_at_n"] = recall
    print(json.dumps(report, indent=1), flush=True)

    # The ranker's examples: each user's validation position and, with --positions P, the
    # P - 1 positions before it. One set of examples for every seed.
    user_vectors = sequential_user_vectors(model, device)
    tasks = ("like", "engage")
    users = np.arange(split.num_users)
    parts = []
    for drop in range(2, 2 + args.positions):
        visible = split.without_last(drop)
        keep = users[np.diff(split.offsets) > drop]
        candidates = plain.retrieve(visible, keep)
        at = split.offsets[keep + 1] - drop
        liked = None if ratings is None else ratings[at]
        labels = candidate_labels(candidates, split.items[at], liked, tasks)
        batch = tables.batch(attributes[keep], user_vectors(visible, keep), candidates)
        parts.append(flatten_examples(batch, labels, candidates))
    examples = RankingBatch(*(torch.cat(f) for f in zip(*(b for b, _ in parts), strict=True)))
    flat_labels = torch.cat([labels for _, labels in parts])
    test_candidates = plain_result.candidates
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        ranker = ranker_class("mmoe-dcn")(
            tables.ranker_config(model.config.embedding_dim, 2, tasks=tasks)
        )
        losses = train_ranker(
            ranker,
            examples,
            flat_labels,
            args.epochs,
            args.learning_rate,
            args.batch_size,
            torch.Generator().manual_seed(seed),
        )
        scorer = ranker_scorer(ranker, tables, user_vectors)
        funnel = Funnel(
            FunnelConfig(
                sources=retrieval.sources,
                retrieve_n=args.retrieve_n,
                task_weights={"engage": 1.0, "like": args.like_weight},
            ),
            sources,
            scorer,
            ranker.config.tasks,
        )
        metrics, _ = funnel_metrics(funnel, views["test"], attributes, stage_targets["test"])
        logits = scorer(
            views["test"], np.arange(split.num_users), attributes, test_candidates
        ).numpy()
        test_labels = candidate_labels(
            test_candidates, stage_targets["test"], target_ratings("test"), ranker.config.tasks
        )
        real = test_candidates.items >= 0
        task_auc = {
            task: auc(logits[..., t][real], test_labels[..., t][real])
            for t, task in enumerate(ranker.config.tasks)
        }
        runs.append(
            {
                "seed": seed,
                "test": metrics,
                "auc": task_auc,
                "losses": losses,
                "examples": len(flat_labels),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    report["funnel_with_ranker"] = runs
    ndcg = [r["test"]["NDCG@10"] for r in runs]
    report["summary"] = {
        "funnel_ndcg_median": statistics.median(ndcg),
        "ratio_to_hstu": statistics.median(ndcg) / report["hstu_alone"]["NDCG@10"],
        "wall_seconds": time.perf_counter() - started,
    }
    print(json.dumps(report["summary"], indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.bundle_out:
        model_bundle = ModelBundle(
            0,
            (args.run / "config.yaml").read_text("utf-8"),
            catalogue.to_text(),
            catalogue.content_hash,
            model.state_dict(),
        )
        digest = write_serving_bundle(
            args.bundle_out,
            model_bundle,
            config.model_name,
            asdict(config.model),
            ranker,
            tables.vocabularies,
            funnel.config,
        )
        print(f"serving bundle {digest[:12]} in {args.bundle_out}")


if __name__ == "__main__":
    main()
