"""Distillation on cold start (issue 17, point 7): can a teacher that names items nobody has
interacted with yet teach HSTU to recommend them?

Cold start as in the semantic-ID runs: the same ``cold_start_share`` of the catalogue is held
out (``held_out_items``), and here every training event of those items is removed
(``SequenceSplit.without_training_items``), so they are new at validation and test time. The
teacher is issue 5's generative retrieval over content codes, trained on that split: the
RQ-VAE and the retriever never see the held-out items, which are coded afterwards from their
content, and TIGER's rule lets them take places next to generated items sharing a code prefix.
(The LLM recommender has no such rule and, trained on these events, would never generate an
item it was not trained on.) Its top-K after every user's training history are the lists;
HSTU is trained on the same split with and without them (the student config's
``train.distill`` settings), and all are scored on test: all users, and the users whose test
item is a held-out one.

    python simulations/bench_distill_cold.py --retrieval-config configs/ml-100k-semantic-ids.yaml \\
        --student configs/ml-100k-hstu-distill.yaml --seeds 0 1 2 --output runs/distill-cold
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from fedrec.config import load_config
from fedrec.data import prepare_split
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit
from fedrec.distillation import TeacherLists
from fedrec.evaluation import EvalConfig, evaluate, popularity_scorer
from fedrec.evaluation.evaluator import Scorer
from fedrec.experiment import environment, write_json_atomic
from fedrec.models import build_model
from fedrec.semantic_id.content import content_embeddings
from fedrec.semantic_id.pipeline import (
    SemanticIdConfig,
    cold_popularity_scorer,
    cold_start_retriever,
    cold_start_users,
    held_out_items,
)
from fedrec.semantic_id.retrieval import evaluate_retrieval, ranked_lists
from fedrec.training import fit, model_scorer, seed_everything
from simulations.bench_centralized import mean_std

METRICS = ("HR@10", "NDCG@10")


def _scored(
    scorer: Scorer, split: SequenceSplit, cold: np.ndarray, users: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Test metrics on each group of users, and the share of their top-10 slots that hold a
    held-out item."""
    out: dict[str, Any] = {}
    for group, members in users.items():
        result = evaluate(scorer, split, "test", EvalConfig(ks=(10,)), users=members, top_n=10)
        out[group] = {m: result.metrics[m] for m in METRICS}
        out[group]["cold_share_of_top10"] = float(np.isin(result.top_items, cold).mean())
    return out


def _teacher(
    sid: SemanticIdConfig,
    dataset: InteractionDataset,
    split: SequenceSplit,
    cold: np.ndarray,
    users: dict[str, np.ndarray],
) -> tuple[TeacherLists, dict[str, Any]]:
    """The generative-retrieval teacher trained on the cold split: its lists (validation
    input) and its test metrics."""
    embeddings = content_embeddings(dataset, sid.content)
    same_cold, retriever, vocabulary, trained = cold_start_retriever(embeddings, split, sid, True)
    assert np.array_equal(same_cold, cold)
    everyone = np.arange(split.num_users)
    started = time.perf_counter()
    lists = ranked_lists(retriever, vocabulary, split, "valid", sid.retrieval, everyone, 32, cold)
    items = np.full((split.num_users, sid.retrieval.top_k), -1, dtype=np.int64)
    for user, listed in enumerate(lists):
        items[user, : len(listed)] = listed
    facts: dict[str, Any] = {
        "encoder": sid.content.encoder,
        "train_seconds": trained["train_seconds"],
        "lists_seconds": time.perf_counter() - started,
        "lists_with_a_cold_item": float(np.isin(items, cold).any(axis=1).mean()),
    }
    for group, members in users.items():
        result = evaluate_retrieval(
            retriever, vocabulary, split, "test", sid.retrieval, members, new_items=cold
        )
        facts[group] = {m: result["metrics"][m] for m in METRICS}
    source = f"generative retrieval ({sid.content.encoder} codes) on a cold split"
    return TeacherLists(items, source), facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--retrieval-config",
        type=Path,
        default=Path("configs/ml-100k-semantic-ids.yaml"),
        help="semantic-ID config: the encoder, the held-out share and the teacher's settings",
    )
    parser.add_argument(
        "--student",
        type=Path,
        default=Path("configs/ml-100k-hstu-distill.yaml"),
        help="HSTU config with train.distill (its teacher path is replaced by the lists here)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/distill-cold"))
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument(
        "--students",
        nargs="+",
        choices=("plain", "distilled"),
        default=["plain", "distilled"],
        help="which HSTU students to train",
    )
    parser.add_argument(
        "--teacher-from",
        type=Path,
        default=None,
        help="an earlier --output of this script: reuse its teacher lists and figures",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)

    student = load_config(args.student)
    sid = load_config(args.retrieval_config).semantic_id
    dataset, full_split = prepare_split(student.data)
    cold = held_out_items(full_split.num_items, sid)
    split = full_split.without_training_items(cold)
    users = {"all": np.arange(split.num_users), "cold": cold_start_users(split, cold)}
    print(f"{len(cold)} held-out items; {len(users['cold'])} users with one as test item")

    if args.teacher_from is None:
        lists, teacher = _teacher(sid, dataset, split, cold, users)
        lists_path = args.output / "teacher-lists.npz"
        lists.save(lists_path)
        write_json_atomic(teacher, args.output / "teacher.json")
    else:
        lists_path = args.teacher_from / "teacher-lists.npz"
        TeacherLists.load(lists_path, split)  # refused here, not after the plain students
        teacher = json.loads((args.teacher_from / "teacher.json").read_text(encoding="utf-8"))
    print(f"teacher: {json.dumps(teacher)}", flush=True)

    # Without interactions the held-out items rank last for popularity on the cold users.
    popularity = _scored(popularity_scorer(split), split, cold, {"all": users["all"]})
    popularity |= _scored(cold_popularity_scorer(split, cold), split, cold, {"cold": users["cold"]})
    students: dict[str, list[dict[str, Any]]] = {variant: [] for variant in args.students}
    for seed in args.seeds:
        for variant in students:
            distill = dataclasses.replace(
                student.train.distill, teacher=str(lists_path) if variant == "distilled" else ""
            )
            train = dataclasses.replace(student.train, distill=distill, progress=False)
            if args.epochs:
                train = dataclasses.replace(train, epochs=args.epochs)
            seed_everything(seed)
            model = build_model(student.model_name, split.num_items, student.model)
            fitted = fit(model, split, train, student.evaluation, seed)
            scores = _scored(model_scorer(model, split, torch.device("cpu")), split, cold, users)
            scores |= {"seed": seed, "best_epoch": fitted.best_epoch}
            scores["seconds_per_epoch"] = fitted.seconds_per_epoch
            students[variant].append(scores)
            print(f"{variant} seed {seed}: {json.dumps(scores)}", flush=True)

    lines = [
        "| model | all: HR@10 | all: NDCG@10 | cold: HR@10 | cold: NDCG@10 | cold share of top-10 |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in (("popularity", popularity), ("teacher", teacher)):
        cells = [f"{row[g][m]:.4f}" for g in ("all", "cold") for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    for variant, runs in students.items():
        cells = [mean_std([r[g][m] for r in runs]) for g in ("all", "cold") for m in METRICS]
        share = mean_std([r["all"]["cold_share_of_top10"] for r in runs])
        lines.append(f"| HSTU {variant} | " + " | ".join(cells) + f" | {share} |")
    table = "\n".join(lines)
    print(table)
    write_json_atomic(
        {
            "cold_items": len(cold),
            "cold_users": len(users["cold"]),
            "teacher": teacher,
            "popularity": popularity,
            "students": students,
            "seeds": args.seeds,
            "table": table,
            "environment": environment(),
        },
        args.output / "results.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
