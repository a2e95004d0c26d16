"""Retrieval sources of the funnel (``fedrec.serving.funnel.Source``): each proposes a user's
top-N items, never one already in the visible history."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedrec.data.batching import history_mask_indices, next_item_batch
from fedrec.data.split import SequenceSplit
from fedrec.llm_rec.model import LLMRecommender
from fedrec.models.base import SequentialRecommender
from fedrec.semantic_id.retrieval import CodeVocabulary, RetrievalConfig, generate_items
from fedrec.serving.funnel import Source

# The funnel's name of ``generative_source`` (``FunnelConfig.sources``).
SEMANTIC_ID_SOURCE = "semantic_id"
LLM_SOURCE = "llm"  # an LLM recommender federation's adapters (fedrec serve --foundation)
# Full scores: (visible histories, users) -> [B, num_items].
FullScorer = Callable[[SequenceSplit, np.ndarray], torch.Tensor]


def top_n_source(score: FullScorer, n: int) -> Source:
    """The ``n`` best items of a full scorer, the user's history masked out."""

    def propose(visible: SequenceSplit, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = score(visible, users).detach().to(torch.float32).clone()
        rows, cols = history_mask_indices(visible, users, None)
        device = scores.device  # masked and cut where they were computed (CUDA or CPU)
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -torch.inf
        top = torch.topk(scores, k=min(n, scores.shape[1]), dim=1)
        items = torch.where(top.values > -torch.inf, top.indices, -1)
        values = top.values.clamp(min=torch.finfo(torch.float32).min)
        return items.cpu().numpy(), values.cpu().numpy()

    return propose


class SequentialEncoder:
    """A sequential model's user vector after each visible history, computed once per batch
    for both its retrieval source and the ranker's user feature (the encoder is most of the
    funnel's cost). The memo is per thread: the service answers requests in parallel."""

    def __init__(self, model: SequentialRecommender, device: torch.device, group: int = 64):
        self.model, self.device, self.group = model, device, group
        self._memo = threading.local()

    def __call__(self, visible: SequenceSplit, users: np.ndarray) -> torch.Tensor:
        """``[len(users), dim]`` on ``device``."""
        key = (users.dtype.str, users.shape, users.tobytes())
        memo = getattr(self._memo, "last", None)
        if memo is not None and memo[0] is visible and memo[1] == key:
            return memo[2]
        if self.model.training:
            self.model.eval()
        # Users of similar history length together, each group padded only to its longest
        # (positions count from the right and pads are masked, so the vectors are the same):
        # attention costs the square of the padded length, and most histories are short.
        lengths = np.minimum(np.diff(visible.offsets)[users], self.model.config.max_len)
        order = np.argsort(lengths, kind="stable")
        vectors = torch.empty(0)
        with torch.no_grad():
            for lo in range(0, len(order), self.group):
                chosen = order[lo : lo + self.group]
                window = max(1, int(lengths[chosen].max()))
                items, times = next_item_batch(visible, users[chosen], window)
                out = self.model.user_vectors(items.to(self.device), times.to(self.device))
                if not len(vectors):
                    vectors = out.new_empty((len(users), out.shape[1]))
                vectors[torch.from_numpy(chosen).to(self.device)] = out
        self._memo.last = (visible, key, vectors)  # holds ``visible``: its id stays unique
        return vectors

    def forget(self) -> None:
        """Drop this thread's memo (a service call's histories end with the call)."""
        self._memo.last = None


def sequential_source(encoder: SequentialEncoder, n: int) -> Source:
    """A sequential model's (HSTU, SASRec) full ranking after each visible history."""

    def score(visible: SequenceSplit, users: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return encoder(visible, users) @ encoder.model.item_vectors().T

    return top_n_source(score, n)


def popularity_source(counts: np.ndarray, n: int) -> Source:
    """The most interacted-with items (public counts, as the catalogue publishes them)."""
    table = torch.as_tensor(np.asarray(counts, dtype=np.float32))
    return top_n_source(lambda visible, users: table.expand(len(users), -1), n)


def generative_source(
    model: Any, vocabulary: CodeVocabulary, config: RetrievalConfig, n: int, batch: int = 16
) -> Source:
    """The semantic-ID model's constrained beam search with ``n`` beams: the items whose codes
    it generates, best first, scored by the log-probability of the code (items already in the
    history are dropped, so a user may get fewer than ``n``)."""

    def propose(visible: SequenceSplit, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = np.full((len(users), n), -1, dtype=np.int64)
        scores = np.zeros((len(users), n), dtype=np.float32)
        for lo in range(0, len(users), batch):
            histories = [visible.full(int(u))[0] for u in users[lo : lo + batch]]
            found = generate_items(model, vocabulary, histories, config, beams=n)
            for row, (history, pairs) in enumerate(zip(histories, found, strict=True)):
                seen = set(history.tolist())
                kept = [(item, score) for item, score in pairs if item not in seen][:n]
                if kept:
                    items[lo + row, : len(kept)] = [item for item, _ in kept]
                    scores[lo + row, : len(kept)] = [score for _, score in kept]
        return items, scores

    return propose


def llm_source(model: LLMRecommender, n: int) -> Source:
    """The LLM recommender's ``n`` best unseen items for each history (its constrained beams,
    widened until ``n`` unseen items come out; the shared prompt: a user's personal prompt
    never leaves their device), scored by log-probability. One user at a time."""

    def propose(visible: SequenceSplit, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = np.full((len(users), n), -1, dtype=np.int64)
        scores = np.zeros((len(users), n), dtype=np.float32)
        for row, user in enumerate(users.tolist()):
            history, times = visible.full(user)
            top = model.top_unseen(history, times, n, visible.num_items)
            if top:
                items[row, : len(top)] = [item for item, _ in top]
                scores[row, : len(top)] = [score for _, score in top]
        return items, scores

    return propose
