"""Batched full-ranking evaluation of any scorer on the leave-one-out split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.data.batching import history_mask_indices
from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.metrics import rank_metrics, target_ranks

# A scorer maps a batch of user ids to scores over all items, shape [len(users), num_items].
Scorer = Callable[[np.ndarray, Stage], torch.Tensor]
# A re-ranker reorders each user's top-N: (users, stage, items [B, N], scores [B, N]) -> items.
Reranker = Callable[[np.ndarray, Stage, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class EvalConfig:
    """Full-ranking protocol.

    ``exclude_history``: items in the user's visible history are removed from the ranking (set
    to -inf), as RecBole and the SASRec/HSTU papers do. A target that is itself in the history
    (only possible without ``drop_duplicates``) then counts as a miss.

    ``sample_users``: a federation's rounds are evaluated on this many users drawn uniformly
    once (the same in every round and run), 0 = every user: at 10⁵ users a full evaluation of
    the LLM recommender's beam search costs more than its training. Audits still see every
    user.
    """

    ks: tuple[int, ...] = (10, 20, 50)
    exclude_history: bool = True
    batch_size: int = 512
    sample_users: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ks, int) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in self.ks
        ):
            raise ValueError(f"evaluation.ks must be a list of positive integers, got {self.ks!r}")
        self.ks = tuple(self.ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(
                f"evaluation.ks must be a non-empty list of positive integers, got {self.ks}"
            )
        if self.batch_size < 1:
            raise ValueError("evaluation.batch_size must be >= 1")
        if self.sample_users < 0:
            raise ValueError("evaluation.sample_users must be >= 0 (0: every user)")


def evaluation_users(split: SequenceSplit, config: EvalConfig) -> np.ndarray | None:
    """``config.sample_users`` users of ``split`` (sorted), or None for every user. The draw is
    fixed (seed 0): it picks whom a benchmark is measured on, nothing a client keeps private."""
    if not config.sample_users or config.sample_users >= split.num_users:
        return None
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(split.num_users, config.sample_users, replace=False))


def metric_names(ks: tuple[int, ...]) -> list[str]:
    """Names of the metrics ``evaluate`` reports for cut-offs ``ks``."""
    return ["MRR"] + [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "Coverage")]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_user: dict[str, np.ndarray]
    users: np.ndarray
    ranks: np.ndarray
    top_items: np.ndarray  # [users, top_n] item ids, -1 for masked slots (top_n 0: no columns)


def evaluate(
    scorer: Scorer,
    split: SequenceSplit,
    stage: Stage,
    config: EvalConfig,
    users: np.ndarray | None = None,
    top_n: int = 0,
    rerank: Reranker | None = None,
) -> EvalResult:
    """Rank every item for each user; metrics from the target's rank.

    ``top_n`` > 0 also returns each user's top-N list (for audits). ``rerank`` reorders that
    list before metrics are taken: a target inside it is ranked where the re-ranker put it, one
    outside keeps its rank (beyond N).
    """
    if rerank is not None and top_n < max(config.ks):
        raise ValueError(f"re-ranking needs top_n >= the largest cut-off {max(config.ks)}")
    users = np.arange(split.num_users) if users is None else np.asarray(users)
    targets_all = split.targets(stage)
    # Written in place, batch by batch: a list of per-batch results kept alive between each
    # batch's large temporaries fragments the heap, and at 10^6 users the driver's resident
    # memory grew by gigabytes that freeing the results never gave back.
    all_ranks = torch.zeros(len(users), dtype=torch.long)
    listed = np.full((len(users), top_n), -1, dtype=np.int64)
    exposed = {k: torch.zeros(split.num_items, dtype=torch.bool) for k in config.ks}
    with torch.no_grad():
        for lo in range(0, len(users), config.batch_size):
            batch = users[lo : lo + config.batch_size]
            scores = scorer(batch, stage).to(torch.float64).cpu().clone()
            if scores.shape != (len(batch), split.num_items):
                raise ValueError(
                    f"scorer returned shape {tuple(scores.shape)}, expected {(len(batch), split.num_items)}"
                )
            if config.exclude_history:
                rows, cols = history_mask_indices(split, batch, stage)
                scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
            batch_ranks = target_ranks(scores, torch.from_numpy(targets_all[batch]))
            top = torch.topk(scores, k=min(max(top_n, *config.ks), scores.shape[1]), dim=1)
            # Masked items are not shown.
            top_items = torch.where(top.values > -torch.inf, top.indices, -1).numpy()
            if rerank is not None:
                before = top_items[:, :top_n]
                top_items = rerank(batch, stage, before, top.values[:, :top_n].numpy())
                batch_ranks = _reranked(batch_ranks, before, top_items, targets_all[batch])
            all_ranks[lo : lo + len(batch)] = batch_ranks
            shown_n = min(top_n, top_items.shape[1])
            listed[lo : lo + len(batch), :shown_n] = top_items[:, :shown_n]
            for k, seen in exposed.items():
                shown = top_items[:, :k]
                seen[torch.from_numpy(shown[shown >= 0])] = True
    per_user = {name: values.numpy() for name, values in rank_metrics(all_ranks, config.ks).items()}
    metrics = {
        name: float(values.mean()) if len(values) else float("nan")
        for name, values in per_user.items()
    }
    for k, seen in exposed.items():
        metrics[f"Coverage@{k}"] = float(seen.float().mean())
    return EvalResult(
        metrics=metrics,
        per_user=per_user,
        users=users,
        ranks=all_ranks.numpy(),
        top_items=listed,
    )


def popularity_scorer(split: SequenceSplit) -> Scorer:
    """Most-popular baseline: items scored by interaction counts in the visible histories."""
    train_counts = torch.from_numpy(split.train_item_counts()).to(torch.float64)
    test_counts = train_counts + torch.bincount(
        torch.from_numpy(split.targets("valid")), minlength=split.num_items
    ).to(torch.float64)

    def score(users: np.ndarray, stage: Stage) -> torch.Tensor:
        counts = train_counts if stage == "valid" else test_counts
        return counts.expand(len(users), -1)

    return score


def _reranked(
    ranks: torch.Tensor, before: np.ndarray, after: np.ndarray, targets: np.ndarray
) -> torch.Tensor:
    """Target ranks after re-ranking: its new position plus the tie penalty it had (pessimistic
    rank minus its position in ``torch.topk``'s order), so an unchanged list keeps the
    pessimistic ranks; targets outside the list stay beyond it."""
    out = torch.maximum(ranks, torch.tensor(after.shape[1] + 1))
    rows, new_positions = np.nonzero(after == targets[:, None])
    old_positions = np.nonzero(before[rows] == targets[rows, None])[1]
    penalty = ranks[torch.from_numpy(rows)] - torch.from_numpy(old_positions + 1)
    out[torch.from_numpy(rows)] = torch.from_numpy(new_positions + 1).to(out.dtype) + penalty
    return out
