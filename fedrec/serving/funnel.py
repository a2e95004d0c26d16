"""The recommendation funnel: retrieve → rank → re-rank → top-K (issue 18).

Every stage is a plain callable, so one ``Funnel`` serves the evaluation of a trained run and
the gRPC service's requests alike:

- a *source* maps the users' visible histories to its top-N items and their scores (HSTU's
  full ranking, the semantic-ID model's beams, popularity); each user's candidates are the union
  of the sources, in source order, duplicates kept at their first source;
- a *ranker* (``RankerScorer``) turns each (user, candidate) pair into one logit per task; the
  fused score is ``Σ_t w_t · log σ(logit_t)``, a weighted product of the task probabilities;
- an optional *re-ranker* (the audit's calibrated or long-tail lists) reorders the fused top
  list; then the first ``k`` items are the answer, each with the stage that placed it.

Users with an empty history get only the ``cold_start_source`` (popularity): a sequential model
has nothing to encode. ``reference_funnel`` recomputes the whole funnel one user at a time with
Python sets and sorts; tests hold the batched path to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from fedrec.audits.metrics import genre_matrix, long_tail_items
from fedrec.audits.rerank import RERANKERS
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.split import SequenceSplit, Stage

# A source: (visible histories, users) -> (items [B, N] with -1 where it found fewer, scores).
Source = Callable[[SequenceSplit, np.ndarray], tuple[np.ndarray, np.ndarray]]
# A ranker: (visible histories, users, their attributes [B, F], candidates) -> logits
# [B, C, tasks] (pads: anything).
RankerScorer = Callable[[SequenceSplit, np.ndarray, np.ndarray, "Candidates"], torch.Tensor]
# A re-ranker: (visible histories, users, items [B, N], scores [B, N]) -> reordered items.
ListReranker = Callable[[SequenceSplit, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

RANKER_STAGE = "ranker"
RERANK_STAGE = "rerank"


@dataclass
class FunnelConfig:
    """``sources``: names of the retrieval sources, in priority order; ``retrieve_n``: items
    each source proposes; ``rank``: order the union by the ranker (off: each source's list
    in turn, the first source's first); ``task_weights``: weight of each ranker task in the fused score;
    ``rerank``: the audit's re-ranker by name ('' for none) and ``rerank_lambda`` its λ;
    ``k``: items returned."""

    sources: tuple[str, ...] = ("hstu", "semantic_id", "popularity")
    retrieve_n: int = 100
    cold_start_source: str = "popularity"
    rank: bool = False
    task_weights: dict[str, float] = field(default_factory=lambda: {"engage": 1.0, "like": 0.5})
    rerank: str = ""
    rerank_lambda: float = 0.5
    k: int = 10

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"funnel.sources: one or more distinct names, got {self.sources}")
        if self.cold_start_source not in self.sources:
            raise ValueError(
                f"funnel.cold_start_source {self.cold_start_source!r} is not among "
                f"funnel.sources {list(self.sources)}"
            )
        if self.retrieve_n < 1 or self.k < 1:
            raise ValueError("funnel.retrieve_n and funnel.k must be >= 1")
        if self.k > self.retrieve_n * len(self.sources):
            raise ValueError(
                f"funnel.k {self.k} exceeds the candidates "
                f"(retrieve_n {self.retrieve_n} × {len(self.sources)} sources)"
            )
        if self.rerank and self.rerank not in RERANKERS:
            raise ValueError(
                f"funnel.rerank {self.rerank!r}: one of {sorted(RERANKERS)}, or '' for none"
            )
        if not 0 <= self.rerank_lambda <= 1:
            raise ValueError("funnel.rerank_lambda must lie in [0, 1]")
        if any(w < 0 for w in self.task_weights.values()) or not any(self.task_weights.values()):
            raise ValueError("funnel.task_weights: non-negative, at least one positive")


class Candidates(NamedTuple):
    """Each user's union of the sources: ``items`` [B, C] (-1 pads), ``source`` [B, C] the
    index of the first source that proposed the item (-1 pads), ``scores`` [B, C, S] every
    source's score of the item and ``found`` [B, C, S] whether that source proposed it."""

    items: np.ndarray
    source: np.ndarray
    scores: np.ndarray
    found: np.ndarray


class FunnelResult(NamedTuple):
    items: np.ndarray  # [B, k] (-1 where fewer candidates)
    scores: np.ndarray  # [B, k] the fused score (the source score when not ranked)
    stages: np.ndarray  # [B, k] object: the source name, "ranker" or "rerank" ("" for pads)
    candidates: Candidates


def merge_sources(
    proposals: list[tuple[np.ndarray, np.ndarray]], cold: np.ndarray, cold_source: int
) -> Candidates:
    """The union of each user's proposals, first source first; ``cold`` users keep only
    ``cold_source``'s. Vectorised (a Python loop over users × candidates cost more than the
    ranker): a stable sort by item groups each row's repeats, the group's first entry in
    source order becomes the candidate, and every entry writes its source's score to it."""
    batch, n_sources = len(cold), len(proposals)
    items = np.concatenate([p[0] for p in proposals], axis=1).astype(np.int64)
    values = np.concatenate([p[1] for p in proposals], axis=1)
    source = np.repeat(np.arange(n_sources), [p[0].shape[1] for p in proposals])
    source = np.broadcast_to(source, items.shape)
    valid = (items >= 0) & (~cold[:, None] | (source == cold_source))
    width = items.shape[1]
    key = np.where(valid, items, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    ordered = np.take_along_axis(key, order, 1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # The first (in source order) entry of each item's group; stable sort: the group's head.
    head_at = np.maximum.accumulate(np.where(starts, np.arange(width), 0), axis=1)
    head = np.take_along_axis(order, head_at, 1)  # per sorted entry: its group's head entry
    is_head = np.zeros(items.shape, dtype=bool)
    np.put_along_axis(is_head, order, starts & (ordered != np.iinfo(np.int64).max), 1)
    column = np.cumsum(is_head, axis=1) - 1  # a head's column among the candidates
    used = max(1, int(is_head.sum(axis=1).max(initial=0)))
    rows = np.broadcast_to(np.arange(batch)[:, None], items.shape)
    out_items = np.full((batch, used), -1, dtype=np.int64)
    out_source = np.full((batch, used), -1, dtype=np.int64)
    out_items[rows[is_head], column[is_head]] = items[is_head]
    out_source[rows[is_head], column[is_head]] = source[is_head]
    scores = np.zeros((batch, used, n_sources), dtype=np.float32)
    found = np.zeros((batch, used, n_sources), dtype=bool)
    entry_valid = np.take_along_axis(valid, order, 1)
    target = np.take_along_axis(column, head, 1)[entry_valid]
    entry_rows, entry = rows[entry_valid], order[entry_valid]
    entry_source = source[entry_rows, entry]
    scores[entry_rows, target, entry_source] = values[entry_rows, entry]
    found[entry_rows, target, entry_source] = True
    return Candidates(out_items, out_source, scores, found)


def fused_scores(
    logits: torch.Tensor, tasks: tuple[str, ...], weights: Mapping[str, float]
) -> torch.Tensor:
    """``Σ_t w_t · log σ(logit_t)`` over the last axis of ``logits`` ([..., tasks])."""
    w = torch.tensor([float(weights.get(t, 0.0)) for t in tasks], dtype=logits.dtype)
    return (torch.nn.functional.logsigmoid(logits) * w).sum(dim=-1)


class Funnel:
    """Retrieval → ranker → re-ranker → top-K with the stages named in ``config``."""

    def __init__(
        self,
        config: FunnelConfig,
        sources: Mapping[str, Source],
        ranker: RankerScorer | None = None,
        tasks: tuple[str, ...] = (),
        reranker: ListReranker | None = None,
    ):
        missing = [name for name in config.sources if name not in sources]
        if missing:
            raise ValueError(f"funnel.sources names {missing}, but only {sorted(sources)} exist")
        if config.rank and ranker is None:
            raise ValueError("funnel.rank is on, but there is no ranker")
        if config.rerank and reranker is None:
            raise ValueError(f"funnel.rerank is {config.rerank!r}, but no re-ranker was given")
        self.config, self.tasks, self.ranker, self.reranker = config, tasks, ranker, reranker
        self.sources = [sources[name] for name in config.sources]

    def retrieve(self, visible: SequenceSplit, users: np.ndarray) -> Candidates:
        cold = np.diff(visible.offsets)[users] == 0
        warm_users = users[~cold]
        proposals = []
        for name, source in zip(self.config.sources, self.sources, strict=True):
            n = self.config.retrieve_n
            items = np.full((len(users), n), -1, dtype=np.int64)
            scores = np.zeros((len(users), n), dtype=np.float32)
            # A cold user gets the cold-start source only: the others never see them.
            rows = np.arange(len(users)) if name == self.config.cold_start_source else ~cold
            asked = users if name == self.config.cold_start_source else warm_users
            if len(asked):
                got, values = source(visible, asked)
                got, values = got[:, :n], values[:, :n]  # a source may offer more
                items[rows, : got.shape[1]], scores[rows, : got.shape[1]] = got, values
            proposals.append((items, scores))
        cold_index = self.config.sources.index(self.config.cold_start_source)
        return merge_sources(proposals, cold, cold_index)

    def __call__(
        self, visible: SequenceSplit, users: np.ndarray, attributes: np.ndarray
    ) -> FunnelResult:
        """The top-K of ``users`` (rows of ``visible``), ``attributes`` [B, F] theirs."""
        candidates = self.retrieve(visible, users)
        pad = candidates.items < 0
        if self.config.rank:
            assert self.ranker is not None
            with torch.no_grad():
                logits = self.ranker(visible, users, attributes, candidates)
            fused = fused_scores(logits.float(), self.tasks, self.config.task_weights).numpy()
            if np.isnan(fused[~pad]).any():  # a broken ranker: no list is better than noise
                raise ValueError("the ranker scored some candidates NaN")
            fused = np.where(pad, -np.inf, fused)
            order = np.argsort(-fused, axis=1, kind="stable")
            stage_of = np.full(candidates.items.shape, RANKER_STAGE, dtype=object)
        else:
            # The first source's list in its own order, then the next source's new items, ...
            source = np.where(pad, len(self.sources), candidates.source)
            fused = np.take_along_axis(
                candidates.scores, source.clip(0, len(self.sources) - 1)[..., None], 2
            )[..., 0]
            fused = np.where(pad, -np.inf, fused)
            order = np.lexsort((-fused, source), axis=1)
            stage_of = np.asarray(self.config.sources, dtype=object)[candidates.source.clip(0)]
        stage_of = np.where(pad, "", stage_of)  # a pad is no item: no stage
        items = np.take_along_axis(candidates.items, order, 1)
        scores = np.take_along_axis(fused, order, 1)
        stages = np.take_along_axis(stage_of, order, 1)
        if self.reranker is not None and self.config.rerank:
            # Unranked, sources score on different scales (cosines, counts): the re-ranker
            # reads the list's order instead, as the relevance it trades against.
            listed = scores if self.config.rank else -np.arange(items.shape[1], dtype=float)
            relevance = np.where(items >= 0, listed, -np.inf)
            reordered = self.reranker(visible, users, items, relevance)
            for row in range(len(users)):
                before = items[row].tolist()
                at = {item: place for place, item in enumerate(before)}
                after = [at.get(item, -1) for item in reordered[row].tolist()]
                scores[row] = [scores[row][a] if a >= 0 else -np.inf for a in after]
                old_stages = stages[row].copy()
                # An item the re-ranker moved up was placed by it; one pushed down was not.
                stages[row] = [
                    RERANK_STAGE if a > place else old_stages[a] if a >= 0 else ""
                    for place, a in enumerate(after)
                ]
            items = reordered
        k = min(self.config.k, items.shape[1])
        return FunnelResult(items[:, :k], scores[:, :k], stages[:, :k], candidates)


def reference_funnel(
    config: FunnelConfig,
    sources: Mapping[str, Source],
    visible: SequenceSplit,
    user: int,
    ranker_logits: Callable[[int], np.ndarray] | None = None,
    tasks: tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """The funnel for one user, without re-ranking: ``ranker_logits(item)`` gives that
    candidate's task logits. Returns ``(item, stage)`` in order."""
    cold = visible.offsets[user + 1] == visible.offsets[user]
    names = [config.cold_start_source] if cold else list(config.sources)
    first: dict[int, tuple[int, float]] = {}
    for name in config.sources:
        if name not in names:
            continue
        items, scores = sources[name](visible, np.array([user]))
        n = config.retrieve_n
        for item, score in zip(items[0, :n].tolist(), scores[0, :n].tolist(), strict=True):
            if item >= 0 and item not in first:
                first[item] = (config.sources.index(name), score)
    if not config.rank:
        ordered = sorted(first, key=lambda i: (first[i][0], -first[i][1]))
        return [(i, config.sources[first[i][0]]) for i in ordered[: config.k]]
    assert ranker_logits is not None

    def fused(item: int) -> float:
        logits = ranker_logits(item)
        return sum(
            config.task_weights.get(t, 0.0) * -np.log1p(np.exp(-logits[j]))
            for j, t in enumerate(tasks)
        )

    ordered = sorted(first, key=fused, reverse=True)
    return [(i, RANKER_STAGE) for i in ordered[: config.k]]


def recall_at_n(candidates: Candidates, targets: np.ndarray) -> dict[str, float]:
    """Share of users whose target is among each source's proposals (``source:<index>``) and
    among the union (``union``)."""
    hit = candidates.items == targets[:, None]
    report = {"union": float(hit.any(axis=1).mean())}
    for s in range(candidates.found.shape[2]):
        report[f"source:{s}"] = float((hit & candidates.found[..., s]).any(axis=1).mean())
    return report


class VisibleHistories:
    """Visible histories as the audit's re-rankers read a split: the whole sequence is the
    history before the next item, whatever the stage."""

    def __init__(self, visible: SequenceSplit):
        self.visible = visible

    def history(self, user: int, stage: Stage) -> tuple[np.ndarray, np.ndarray]:
        return self.visible.full(user)


def audit_reranker(config: FunnelConfig, catalogue: ItemCatalogue) -> ListReranker:
    """The audit's re-ranker named by ``config.rerank`` over the fused list: calibration to the
    genres of the user's history (the catalogue's genres), or long-tail exposure (the tail of
    the catalogue's popularity, as the audit draws it)."""
    method = config.rerank
    if method == "calibrated":
        genres = catalogue.item_features.get("genres")
        if genres is None:
            raise ValueError("calibrated re-ranking needs item genres, and the catalogue has none")
        table = genre_matrix(np.asarray(genres))[0]
    else:
        if catalogue.popularity is None:
            raise ValueError(f"{method} re-ranking needs the catalogue's popularity")
        table = long_tail_items(np.asarray(catalogue.popularity))

    def rerank(
        visible: SequenceSplit, users: np.ndarray, items: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        make = RERANKERS[method]
        reorder = make(VisibleHistories(visible), table, config.k, config.rerank_lambda)
        return reorder(users, "test", items, scores)

    return rerank
