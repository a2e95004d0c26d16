"""The multi-task ranker inside the funnel: its scorer, its labelled examples and its training.

Examples are the funnel's own candidates: a user's retrieval union at a point of their history,
each candidate labelled *engage* (it is the item the user took next) and *like* (it is, and they
rated it ≥ ``LIKE_RATING``). A device builds them from its own history and ratings; centrally,
each user's last positions before the test item do (``simulations/bench_funnel.py
--positions``), the test item never.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from fedrec.data.split import SequenceSplit
from fedrec.models.ranking import MultiTaskRanker, RankingBatch
from fedrec.serving.features import FeatureTables
from fedrec.serving.funnel import Candidates, Funnel, RankerScorer
from fedrec.serving.sources import SequentialEncoder

LIKE_RATING = 4.0
UserVectors = Callable[[SequenceSplit, np.ndarray], torch.Tensor]


def sequential_user_vectors(encoder: SequentialEncoder) -> UserVectors:
    """The sequential model's user vector after each visible history (zeros when empty)."""

    def vectors(visible: SequenceSplit, users: np.ndarray) -> torch.Tensor:
        out = encoder(visible, users).float().cpu()
        empty = torch.from_numpy(np.diff(visible.offsets)[users] == 0)
        return torch.where(empty[:, None], 0.0, out)

    return vectors


def ranker_scorer(
    model: MultiTaskRanker, tables: FeatureTables, user_vectors: UserVectors, chunk: int = 4096
) -> RankerScorer:
    """Scores ``chunk`` pairs per forward pass: a batch of 256 users × 200 candidates is 51,200
    rows, and their [rows, 151] activations (31 MB each) overflow the CPU's caches, so the
    element-wise half of the ranker ran at memory speed."""

    def score(
        visible: SequenceSplit, users: np.ndarray, attributes: np.ndarray, candidates: Candidates
    ) -> torch.Tensor:
        if model.training:
            model.eval()
        batch = tables.batch(attributes, user_vectors(visible, users), candidates)
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(RankingBatch(*(f[lo : lo + chunk].to(device) for f in batch))).cpu()
                    for lo in range(0, len(batch.user), chunk)
                ]
            )
        return logits.reshape(*candidates.items.shape, -1)

    return score


def candidate_labels(
    candidates: Candidates,
    targets: np.ndarray,
    target_ratings: np.ndarray | None,
    tasks: tuple[str, ...],
) -> np.ndarray:
    """[B, C, tasks] 0/1 labels of each candidate (pads: 0)."""
    engaged = candidates.items == targets[:, None]
    if target_ratings is None and "like" in tasks:
        raise ValueError("the like task needs ratings, and this data set has none")
    liked = engaged & (
        (target_ratings >= LIKE_RATING)[:, None] if target_ratings is not None else False
    )
    columns = {"engage": engaged, "like": liked}
    return np.stack([columns[t] for t in tasks], axis=2).astype(np.float32)


def flatten_examples(
    batch: RankingBatch, labels: np.ndarray, candidates: Candidates
) -> tuple[RankingBatch, torch.Tensor]:
    """The real (non-pad) pairs of a batch and their labels."""
    keep = torch.from_numpy((candidates.items >= 0).reshape(-1))
    return RankingBatch(*(field[keep] for field in batch)), torch.from_numpy(
        labels.reshape(-1, labels.shape[2])
    )[keep]


def ranker_examples(
    funnel: Funnel,
    tables: FeatureTables,
    user_vectors: UserVectors,
    split: SequenceSplit,
    attributes: np.ndarray,
    drops: Iterable[int],
    tasks: tuple[str, ...],
) -> tuple[RankingBatch, torch.Tensor, np.ndarray] | None:
    """The labelled pairs of ``split``'s users at each position ``drop`` events before the end
    of their sequence: the funnel's candidates from the history before that position, labelled
    by the item at it (and its rating). Returns (examples, labels [pairs, tasks], the user of
    each pair), or None without any: users with no history before a position have no examples
    at it."""
    users = np.arange(split.num_users)
    parts, owners = [], []
    for drop in drops:
        keep = users[np.diff(split.offsets) > drop]
        if not len(keep):
            continue
        visible = split.without_last(drop)
        candidates = funnel.retrieve(visible, keep)
        at = split.offsets[keep + 1] - drop
        liked = None if split.ratings is None else split.ratings[at]
        labels = candidate_labels(candidates, split.items[at], liked, tasks)
        batch = tables.batch(attributes[keep], user_vectors(visible, keep), candidates)
        parts.append(flatten_examples(batch, labels, candidates))
        owners.append(np.repeat(keep, (candidates.items >= 0).sum(axis=1)))
    if not parts:
        return None
    examples = RankingBatch(*(torch.cat(f) for f in zip(*(b for b, _ in parts), strict=True)))
    return examples, torch.cat([labels for _, labels in parts]), np.concatenate(owners)


def train_ranker(
    model: MultiTaskRanker,
    examples: RankingBatch,
    labels: torch.Tensor,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    generator: torch.Generator,
    optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    progress: bool = True,
) -> list[float]:
    """``optimizer_class`` (Adam; a federated client: SGD) on the mean per-example loss;
    returns each epoch's mean loss."""
    optimizer = optimizer_class(model.parameters(), lr=learning_rate)
    losses = []
    for _ in tqdm(range(epochs), desc="ranker", unit="epoch", leave=False, disable=not progress):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for lo in range(0, len(order), batch_size):
            index = order[lo : lo + batch_size]
            loss = model.per_example_loss(
                RankingBatch(*(f[index] for f in examples)), labels[index]
            ).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(order))
    return losses
