"""The recommendation funnel on a trained sequential run (issue 18), measured side by side:

    python simulations/bench_funnel.py --run runs/ml-100k-hstu --seeds 0 1 2

- HSTU alone (full ranking, the run's own model), and the funnel without a ranker (must equal
  it when HSTU is the first source: the funnel's reference check at scale);
- recall@N of each retrieval source and of their union, on the test targets;
- the multi-task ranker trained on the funnel's candidates at each user's last --positions
  positions before the test item (the validation item and those before it; never the test
  item), its AUC per task on the test candidates, and the funnel's test NDCG@10 / HR@10 with
  it, per ranker seed; with --federated, the same ranker trained by FedAvg over users.

Popularity is the training counts (what the catalogue publishes). Full ranking: every item the
user has not seen is a candidate of HSTU and popularity; the funnel's answer is its top-K.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.server.strategy.aggregate import aggregate
from flwr.supercore.differential_privacy import compute_clip_model_update
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrec.config import load_config  # noqa: E402
from fedrec.data import prepare_split  # noqa: E402
from fedrec.data.catalogue import ItemCatalogue  # noqa: E402
from fedrec.data.split import SequenceSplit, Stage  # noqa: E402
from fedrec.evaluation import EvalConfig, evaluate  # noqa: E402
from fedrec.evaluation.metrics import rank_metrics  # noqa: E402
from fedrec.models.ranking import MultiTaskRanker, RankingBatch, ranker_class  # noqa: E402
from fedrec.privacy.accounting import epsilon_without_replacement  # noqa: E402
from fedrec.privacy.randomness import numpy_generator  # noqa: E402
from fedrec.privacy_audit import load_model, run_config  # noqa: E402
from fedrec.semantic_id.pipeline import catalogue_codes, train_generative_retrieval  # noqa: E402
from fedrec.serving.bundle import ModelBundle  # noqa: E402
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables  # noqa: E402
from fedrec.serving.funnel import Funnel, FunnelConfig, recall_at_n  # noqa: E402
from fedrec.serving.ranker import (  # noqa: E402
    candidate_labels,
    ranker_examples,
    ranker_scorer,
    sequential_user_vectors,
    train_ranker,
)
from fedrec.serving.sources import (  # noqa: E402
    SEMANTIC_ID_SOURCE,
    SequentialEncoder,
    generative_source,
    popularity_source,
    sequential_source,
)
from fedrec.serving.store import GenerativeRetriever, write_serving_bundle  # noqa: E402
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


def fedavg_ranker(
    model: MultiTaskRanker,
    examples: RankingBatch,
    labels: torch.Tensor,
    owner: np.ndarray,
    rounds: int,
    cohort: int,
    local_epochs: int,
    local_learning_rate: float,
    clip: float,
    noise_multiplier: float,
    seed: int,
    delta: float = 1e-5,
    server_optimizer: str = "sgd",
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
) -> dict[str, Any]:
    """FedAvg of ``model`` over users, each a device holding only its own candidates and
    labels: ``cohort`` users a round (drawn without replacement), each ``local_epochs`` of SGD
    from the global weights (batches of 64), averaged by Flower's ``aggregate`` weighted by
    examples. The server applies the mean update through ``server_optimizer`` with the update's
    negative as the gradient (Reddi et al., "Adaptive Federated Optimization"): SGD at rate 1
    is FedAvg, with ``server_momentum`` FedAvgM, ``adam`` FedAdam (as Flower's FedAvgM and
    FedAdam strategies update; post-processing, so no privacy cost). ``noise_multiplier`` > 0:
    DP-FedAvg as the server's DP wrapper runs it: each update clipped to ``clip`` (Flower's
    ``compute_clip_model_update``), the unweighted mean plus N(0, (σ·clip / cohort)²) from
    private randomness, and the user-level ε of the rounds (fixed-size cohorts without
    replacement, replace-one) from fedrec's accountant. A simulation of the rounds in one
    process: the ranker is not yet a FederatedModel of the Flower apps."""
    order = np.argsort(owner, kind="stable")
    users, starts = np.unique(owner[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    cohort = min(cohort, len(users))
    # Under DP the cohorts must be secret for the sampling to amplify privacy: both the
    # cohort draws and the noise come from private randomness, never from --seeds.
    private = noise_multiplier > 0
    sampler = numpy_generator(None if private else seed)
    noise = numpy_generator(None)
    local = copy.deepcopy(model)
    shuffle = torch.Generator().manual_seed(seed)
    losses = []
    server = (
        torch.optim.Adam(model.parameters(), lr=server_learning_rate, eps=1e-3)
        if server_optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=server_learning_rate, momentum=server_momentum)
    )
    for _ in tqdm(range(rounds), desc="federated ranker", unit="round", leave=False):
        current = [p.detach().numpy().copy() for p in model.parameters()]
        replies, round_loss = [], []
        for u in sampler.choice(len(users), cohort, replace=False):
            index = torch.from_numpy(order[starts[u] : ends[u]])
            with torch.no_grad():
                for target, value in zip(local.parameters(), current, strict=True):
                    target.copy_(torch.from_numpy(value))
            round_loss += train_ranker(
                local,
                RankingBatch(*(f[index] for f in examples)),
                labels[index],
                local_epochs,
                local_learning_rate,
                64,
                shuffle,
                torch.optim.SGD,
                progress=False,
            )
            new = [p.detach().numpy().copy() for p in local.parameters()]
            if noise_multiplier > 0:
                compute_clip_model_update(new, current, clip)
            replies.append((new, len(index)))
        if noise_multiplier > 0:
            mean = [
                c
                + (
                    sum(n[i] - c for n, _ in replies)
                    + noise.normal(0, noise_multiplier * clip, c.shape)
                )
                / cohort
                for i, c in enumerate(current)
            ]
        else:
            mean = aggregate(replies)
        with torch.no_grad():
            for target, value in zip(model.parameters(), mean, strict=True):
                target.grad = target - torch.from_numpy(np.asarray(value, dtype=np.float32))
        server.step()
        losses.append(float(np.mean(round_loss)))
    model.eval()
    facts: dict[str, Any] = {
        "rounds": rounds,
        "cohort": cohort,
        "users": len(users),
        "server": [server_optimizer, server_learning_rate, server_momentum],
    }
    if not private:  # the clients' losses are outside ε: reported only without DP
        facts["losses"] = losses
    if private:
        # Replacing one user moves the sum of clipped updates by up to 2·clip: σ halves
        # (as fedrec.federation.privacy accounts fixed-size cohorts).
        facts["epsilon"] = epsilon_without_replacement(
            [(noise_multiplier / 2, cohort, len(users), rounds)], delta
        )
        facts["delta"] = delta
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a finished HSTU/SASRec run folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="ranker seeds")
    parser.add_argument("--retrieve-n", type=int, default=100, help="items per source")
    parser.add_argument(
        "--semantic-ids",
        type=Path,
        help="an experiment YAML whose semantic_id section makes the codes and trains the "
        "generative retrieval model on the run's split: adds the semantic-ID beam source and "
        "the code feature (e.g. configs/ml-100k-semantic-ids.yaml; minutes)",
    )
    parser.add_argument(
        "--ranker-option",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="ranker settings (RankerConfig), e.g. cross_rank=16 expert_dim=32",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--positions",
        type=int,
        default=1,
        help="ranker examples from each user's last P positions before the test item (1: the "
        "validation item only; more reach into what the sequential model trained on)",
    )
    parser.add_argument(
        "--before-validation",
        action="store_true",
        help="take the P positions before the validation item instead (held out, as a "
        "federation's clients build their examples: configs/ml-100k-ranker-federated.yaml)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--like-weight", type=float, default=0.5)
    parser.add_argument(
        "--federated",
        type=float,
        nargs="*",
        default=[],
        metavar="NOISE",
        help="also train the ranker by FedAvg over users, once per noise multiplier (0: no DP; "
        "> 0: DP-FedAvg with --clip, user-level ε reported)",
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--cohort", type=int, default=100, help="users per round")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--local-learning-rate", type=float, default=0.05)
    parser.add_argument(
        "--server-optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="how the server applies the mean update: sgd (rate 1, no momentum: FedAvg; "
        "with --server-momentum: FedAvgM) or adam (FedAdam)",
    )
    parser.add_argument("--server-learning-rate", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=1.0, help="update norm bound (DP only)")
    parser.add_argument(
        "--retrieval-only",
        action="store_true",
        help="stop after HSTU alone, the funnel without a ranker and each source's recall",
    )
    parser.add_argument("--output", type=Path, help="write the report here (JSON)")
    parser.add_argument(
        "--bundle-out",
        type=Path,
        help="write a serving bundle (the run's model, the last seed's ranker, the funnel) "
        "into this new folder, for `fedrec serve --bundle`",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    ranker_options = {
        name: yaml.safe_load(value)
        for name, value in (option.split("=", 1) for option in args.ranker_option)
    }
    started = time.perf_counter()

    config = run_config(args.run)
    dataset, split = prepare_split(config.data)
    model = load_model(args.run, config, split.num_items)
    device = torch.device("cpu")
    counts = split.train_item_counts()
    extra_sources = {}
    codes, generative = None, None
    if args.semantic_ids:
        semantic = load_config(args.semantic_ids).semantic_id
        ids, _ = catalogue_codes(dataset, semantic)
        retriever, vocabulary, facts = train_generative_retrieval(
            ids.codes, ids.codebook_size, split, semantic, None, True
        )
        codes = ids.codes
        generative = GenerativeRetriever(retriever, vocabulary, semantic.retrieval)
        extra_sources[SEMANTIC_ID_SOURCE] = generative_source(
            retriever, vocabulary, semantic.retrieval, args.retrieve_n
        )
        print(f"semantic IDs: {ids.report}; retrieval trained in {facts['train_seconds']:.0f} s")
    catalogue = ItemCatalogue.from_dataset(dataset, popularity=counts, codes=codes)
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
    ratings = split.ratings
    encoder = SequentialEncoder(model, device)
    sources = {
        config.model_name: sequential_source(encoder, args.retrieve_n),
        **extra_sources,
        "popularity": popularity_source(counts, args.retrieve_n),
    }
    retrieval = FunnelConfig(sources=tuple(sources), retrieve_n=args.retrieve_n, rank=False)
    views = {stage: split.visible(stage) for stage in ("valid", "test")}
    stage_targets: dict[Stage, np.ndarray] = {s: split.targets(s) for s in ("valid", "test")}
    cut = {"valid": 2, "test": 1}

    def target_ratings(stage: Stage) -> np.ndarray | None:
        return None if ratings is None else ratings[split.offsets[1:] - cut[stage]]

    report: dict[str, Any] = {
        "run": str(args.run),
        "sources": list(retrieval.sources),
        "ranker_options": ranker_options,
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
    if args.retrieval_only:
        if args.output:
            args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return

    # The ranker's examples: each user's validation position (or, --before-validation, the
    # position before it) and, with --positions P, the P - 1 positions before that. One set of
    # examples for every seed.
    user_vectors = sequential_user_vectors(encoder)
    tasks = ("like", "engage")
    users = np.arange(split.num_users)
    first = 3 if args.before_validation else 2  # events from the end: 2 is the validation item
    labelled = ranker_examples(
        plain, tables, user_vectors, split, attributes, range(first, first + args.positions), tasks
    )
    assert labelled is not None  # every user has a validation position
    examples, flat_labels, owner = labelled
    test_candidates = plain_result.candidates
    ranker_config = tables.ranker_config(
        model.config.embedding_dim, len(sources), tasks=tasks, **ranker_options
    )
    funnel_config = FunnelConfig(
        sources=retrieval.sources,
        retrieve_n=args.retrieve_n,
        rank=True,
        task_weights={"engage": 1.0, "like": args.like_weight},
    )
    test_labels = candidate_labels(
        test_candidates, stage_targets["test"], target_ratings("test"), tasks
    )
    real = test_candidates.items >= 0

    def assess(ranker: MultiTaskRanker) -> dict[str, Any]:
        scorer = ranker_scorer(ranker, tables, user_vectors)
        funnel = Funnel(funnel_config, sources, scorer, tasks)
        try:
            metrics, _ = funnel_metrics(funnel, views["test"], attributes, stage_targets["test"])
        except ValueError as err:  # a diverged ranker (NaN scores): no figures
            return {"failed": str(err)}
        logits = scorer(views["test"], users, attributes, test_candidates).numpy()
        task_auc = {
            task: auc(logits[..., t][real], test_labels[..., t][real])
            for t, task in enumerate(tasks)
        }
        return {"test": metrics, "auc": task_auc}

    runs = []
    ranker = None
    for seed in args.seeds:
        torch.manual_seed(seed)
        ranker = ranker_class("mmoe-dcn")(ranker_config)
        started_training = time.perf_counter()
        losses = train_ranker(
            ranker,
            examples,
            flat_labels,
            args.epochs,
            args.learning_rate,
            args.batch_size,
            torch.Generator().manual_seed(seed),
        )
        run = {
            "seed": seed,
            "central": {
                **assess(ranker),
                "losses": losses,
                "seconds": time.perf_counter() - started_training,
            },
            "examples": len(flat_labels),
        }
        print(json.dumps(run), flush=True)
        for noise in args.federated:
            torch.manual_seed(seed)
            federated = ranker_class("mmoe-dcn")(ranker_config)
            started_training = time.perf_counter()
            facts = fedavg_ranker(
                federated, examples, flat_labels, owner, args.rounds, args.cohort,
                args.local_epochs, args.local_learning_rate, args.clip, noise, seed,
                server_optimizer=args.server_optimizer,
                server_learning_rate=args.server_learning_rate,
                server_momentum=args.server_momentum,
            )  # fmt: skip
            facts["seconds"] = time.perf_counter() - started_training
            run[f"federated_noise_{noise:g}"] = {**assess(federated), **facts}
            print(
                json.dumps({f"federated_noise_{noise:g}": run[f"federated_noise_{noise:g}"]}),
                flush=True,
            )
        runs.append(run)
    report["funnel_with_ranker"] = runs
    ndcg = [r["central"]["test"]["NDCG@10"] for r in runs]
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
            funnel_config,
            retriever=generative,
        )
        print(f"serving bundle {digest[:12]} in {args.bundle_out}")


if __name__ == "__main__":
    main()
