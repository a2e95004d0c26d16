"""``fedrec semantic-ids``: content embeddings → RQ-VAE codes → generative retrieval, measured.

Privacy: the RQ-VAE is trained on the item catalogue only (titles, genres, years: public
content, no user data), so the codes reveal nothing about users. With the ``collab`` encoder
the embeddings come from a recommender trained on interactions; in the federation that is the
global model every client already receives (and, under DP, post-processing of a DP release),
so its codes add no exposure beyond the model itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.evaluation.evaluator import Scorer
from fedrec.semantic_id.content import ContentConfig, content_embeddings, item_texts
from fedrec.semantic_id.retrieval import (
    CodeVocabulary,
    RetrievalConfig,
    build_model,
    evaluate_retrieval,
    train_retrieval,
    training_windows,
)
from fedrec.semantic_id.rqvae import RQVAEConfig, SemanticIds, build_semantic_ids, disambiguate

log = logging.getLogger("fedrec.semantic_id")


@dataclass
class SemanticIdConfig:
    """``cold_start_share``: share of items held out of RQ-VAE and retrieval training to measure
    cold start (0 skips it). ``extra_vocab_margin``: spare extra-level tokens for items coded
    later."""

    content: ContentConfig = field(default_factory=ContentConfig)
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    cold_start_share: float = 0.05
    extra_vocab_margin: int = 16
    examples: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.cold_start_share < 0.5:
            raise ValueError("semantic_id.cold_start_share must lie in [0, 0.5)")
        if self.extra_vocab_margin < 0:
            raise ValueError("semantic_id.extra_vocab_margin must be >= 0")


def prefix_examples(
    ids: SemanticIds, titles: list[str], groups: int, per_group: int = 5
) -> dict[str, list[str]]:
    """Descriptions of the items behind the most populated two-level prefixes."""
    members: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for item, code in enumerate(ids.codes.tolist()):
        members[tuple(code[:2])].append(item)
    biggest = sorted(members, key=lambda k: -len(members[k]))[:groups]
    return {
        "-".join(map(str, k)): [str(titles[i]) for i in members[k][:per_group]] for k in biggest
    }


def train_generative_retrieval(
    codes: np.ndarray,
    codebook_size: int,
    split: SequenceSplit,
    config: SemanticIdConfig,
    skip: np.ndarray | None,
    progress: bool,
) -> tuple[Any, CodeVocabulary, dict[str, Any]]:
    """A retrieval model trained on ``split``'s training windows (without items ``skip``): the
    model, its vocabulary and the training facts."""
    extra = int(codes[:, -1].max()) + 1 + config.extra_vocab_margin
    vocabulary = CodeVocabulary(codes, codebook_size, extra)
    windows = training_windows(split, vocabulary, config.retrieval.max_items, skip)
    model = build_model(vocabulary, config.retrieval)
    started = time.perf_counter()
    losses = train_retrieval(model, windows, config.retrieval, progress)
    out: dict[str, Any] = {
        "windows": len(windows),
        "train_seconds": time.perf_counter() - started,
        "loss_by_epoch": losses,
    }
    return model, vocabulary, out


def catalogue_codes(
    dataset: InteractionDataset, config: SemanticIdConfig, progress: bool = True
) -> tuple[SemanticIds, np.ndarray]:
    """Every item's code from its content (encoder + RQ-VAE), and the content embeddings."""
    embeddings = content_embeddings(dataset, config.content)
    ids, _ = build_semantic_ids(embeddings, config.rqvae, list(dataset.raw_item_ids), progress)
    ids.config["content"] = asdict(config.content)
    return ids, embeddings


def run_semantic_ids(
    config: SemanticIdConfig,
    dataset: InteractionDataset,
    split: SequenceSplit,
    run_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Codes for every item (saved as the shared artefact), generative retrieval on the
    leave-one-out split and, with ``cold_start_share``, retrieval of items unseen in training."""
    torch.set_num_threads(1)
    ids, embeddings = catalogue_codes(dataset, config, progress)
    ids.save(run_dir / "semantic_ids")
    titles = item_texts(dataset)
    results: dict[str, Any] = {
        "items": dataset.num_items,
        "encoder": config.content.encoder,
        "embedding_dim": int(embeddings.shape[1]),
        "codes": ids.report,
        "prefix_examples": prefix_examples(ids, titles, config.examples),
    }
    log.info("codes: %s", ids.report)
    model, vocabulary, retrieval = train_generative_retrieval(
        ids.codes, ids.codebook_size, split, config, None, progress
    )
    for stage in ("valid", "test"):
        retrieval[stage] = evaluate_retrieval(model, vocabulary, split, stage, config.retrieval)
    results["retrieval"] = retrieval
    if config.cold_start_share > 0:
        results["cold_start"] = cold_start(embeddings, split, config, progress)
    return results


def held_out_items(num_items: int, config: SemanticIdConfig) -> np.ndarray:
    """The cold-start items: ``cold_start_share`` of the catalogue drawn with the RQ-VAE's seed,
    so that every recommender measured on cold start (retrieval, the LLM's zero shot) holds out
    the same items and is scored on the same users."""
    rng = np.random.default_rng(config.rqvae.seed)
    size = max(1, round(config.cold_start_share * num_items))
    return np.sort(rng.choice(num_items, size=size, replace=False))


def cold_start_users(split: SequenceSplit, cold: np.ndarray) -> np.ndarray:
    """Users whose test item is a cold one."""
    return np.flatnonzero(np.isin(split.targets("test"), cold))


def cold_popularity_scorer(split: SequenceSplit, cold: np.ndarray) -> Scorer:
    """Popularity at test time when the ``cold`` items had no interactions: they rank last."""
    counts = split.train_item_counts().astype(np.float64)
    counts[cold] = 0.0
    for item in split.targets("valid"):
        counts[item] += item not in cold  # the test history includes the validation item
    scores = torch.from_numpy(counts)
    return lambda batch, stage: scores.expand(len(batch), -1)


def cold_start_retriever(
    embeddings: np.ndarray, split: SequenceSplit, config: SemanticIdConfig, progress: bool
) -> tuple[np.ndarray, Any, CodeVocabulary, dict[str, Any]]:
    """``(cold items, retriever, vocabulary, training facts)``: the RQ-VAE and the retriever
    trained without the held-out items, which are coded afterwards from content alone."""
    n = split.num_items
    cold = held_out_items(n, config)
    warm = np.setdiff1d(np.arange(n), cold)
    ids, model = build_semantic_ids(embeddings[warm], config.rqvae, [], progress)
    taken: dict[tuple[int, ...], int] = defaultdict(int)
    for code in ids.codes[:, :-1].tolist():
        taken[tuple(code)] += 1
    codes = np.empty((n, ids.codes.shape[1]), dtype=np.int64)
    codes[warm] = ids.codes
    codes[cold] = disambiguate(model.codes(embeddings[cold]), taken)
    retriever, vocabulary, trained = train_generative_retrieval(
        codes, ids.codebook_size, split, config, cold, progress
    )
    return cold, retriever, vocabulary, trained


def cold_start(
    embeddings: np.ndarray, split: SequenceSplit, config: SemanticIdConfig, progress: bool
) -> dict[str, Any]:
    """Hold out a random share of items from the RQ-VAE and from retrieval training; code them
    afterwards from content alone and measure HR@K on users whose test item is one of them,
    next to popularity (which, without interactions, ranks them last)."""
    cold, retriever, vocabulary, trained = cold_start_retriever(embeddings, split, config, progress)
    users = cold_start_users(split, cold)
    # The configured new-item rule and a small grid around it, all reported.
    rules = {(config.retrieval.new_item_prefix, config.retrieval.new_item_slots)}
    rules |= {(p, n) for p in (1, 2) for n in (0, 1, 3)}
    for prefix, slots in sorted(rules):
        rule = dataclasses.replace(
            config.retrieval,
            new_item_prefix=prefix,
            new_item_slots=min(slots, config.retrieval.top_k),
        )
        result = evaluate_retrieval(
            retriever, vocabulary, split, "test", rule, users, new_items=cold
        )
        trained[f"prefix={prefix},slots={slots}"] = result["metrics"]
    k = config.retrieval.top_k
    popularity = evaluate(
        cold_popularity_scorer(split, cold), split, "test", EvalConfig(ks=(k,)), users=users
    ).metrics
    r = config.retrieval
    return {
        "cold_items": len(cold),
        "users": len(users),
        "retrieval": trained[f"prefix={r.new_item_prefix},slots={r.new_item_slots}"],
        "by_rule": {k: v for k, v in trained.items() if k.startswith("prefix=")},
        "popularity": {f"HR@{k}": popularity[f"HR@{k}"], f"NDCG@{k}": popularity[f"NDCG@{k}"]},
        "train_seconds": trained["train_seconds"],
    }
