"""Retrieval sources of the funnel (``fedrec.serving.funnel.Source``): each proposes a user's
top-N items, never one already in the visible history."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedrec.data.batching import history_mask_indices, next_item_batch
from fedrec.data.split import SequenceSplit
from fedrec.models.base import SequentialRecommender
from fedrec.serving.funnel import Source

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


def sequential_source(model: SequentialRecommender, n: int, device: torch.device) -> Source:
    """A sequential model's (HSTU, SASRec) full ranking after each visible history."""

    def score(visible: SequenceSplit, users: np.ndarray) -> torch.Tensor:
        model.eval()
        items, times = next_item_batch(visible, users, model.config.max_len)
        with torch.no_grad():
            return model.score_all(items.to(device), times.to(device))

    return top_n_source(score, n)


def popularity_source(counts: np.ndarray, n: int) -> Source:
    """The most interacted-with items (public counts, as the catalogue publishes them)."""
    table = torch.as_tensor(np.asarray(counts, dtype=np.float32))
    return top_n_source(lambda visible, users: table.expand(len(users), -1), n)
