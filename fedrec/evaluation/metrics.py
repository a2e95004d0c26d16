"""Full-ranking metrics for one held-out target per user.

Ranks are pessimistic under ties: the target is placed after every other item with the same
score, so a constant scorer earns nothing and ties can never inflate a result.
"""

from __future__ import annotations

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target among all columns: ``#{j : s_j >= s_target}``."""
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1)


def rank_metrics(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-user HR@K, NDCG@K and MRR from 1-based ranks (single relevant item)."""
    ranks = ranks.to(torch.float64)
    out: dict[str, torch.Tensor] = {"MRR": 1.0 / ranks}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = hit.to(torch.float64)
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))
    return out
