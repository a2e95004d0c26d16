"""Re-ranking a user's top-N before the top-K is shown: calibration and long-tail exposure.

No maintained library offers these re-rankers for arbitrary scorers (RecBole and Elliot only
measure), so they are written here, greedy as in the papers. Each reorders the first ``k``
positions of the top-N and keeps the rest in model order; λ = 0 returns the model's list.
Scores are min-max normalised per user over the top-N so λ means the same for any model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import numpy as np

from fedrec.data.split import Stage
from fedrec.evaluation.evaluator import Reranker


class Histories(Protocol):
    """What a re-ranker reads of the users: the history each had before ``stage``'s target
    (a ``SequenceSplit``, or the serving funnel's visible histories)."""

    def history(self, user: int, stage: Stage) -> tuple[np.ndarray, np.ndarray]: ...


def _normalised(scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min()
    hi = np.where(finite, scores, -np.inf).max()
    span = hi - lo if hi > lo else 1.0
    return np.where(finite, (scores - lo) / span, -np.inf)


def _greedy(
    items: np.ndarray, k: int, gain: Callable[[list[int], np.ndarray], np.ndarray]
) -> np.ndarray:
    """Pick ``k`` positions one by one, each time the candidate maximising ``gain(chosen,
    remaining)``; the unchosen candidates follow in model order."""
    valid = [int(i) for i in np.flatnonzero(items >= 0)]
    remaining = list(valid)
    chosen: list[int] = []
    for _ in range(min(k, len(valid))):
        values = gain(chosen, np.array(remaining))
        chosen.append(remaining.pop(int(np.argmax(values))))
    order = chosen + remaining + [int(i) for i in np.flatnonzero(items < 0)]
    return items[np.array(order, dtype=np.int64)]


def _calibrated_list(
    items: np.ndarray,
    scores: np.ndarray,
    p: np.ndarray,
    genres: np.ndarray,
    k: int,
    lam: float,
    alpha: float,
) -> np.ndarray:
    s = _normalised(scores)
    cand = genres[items.clip(min=0)]
    support = p > 0

    def gain(chosen: list[int], remaining: np.ndarray) -> np.ndarray:
        q_mass = cand[chosen].sum(axis=0) + cand[remaining]  # [R, G]
        totals = q_mass.sum(axis=1, keepdims=True)
        q = np.divide(q_mass, totals, out=np.zeros_like(q_mass), where=totals > 0)
        q_tilde = (1 - alpha) * q + alpha * p
        kl = (p[support] * np.log(p[support] / q_tilde[:, support])).sum(axis=1)
        return (1 - lam) * (s[chosen].sum() + s[remaining]) - lam * kl

    return _greedy(items, k, gain)


def _long_tail_list(
    items: np.ndarray, scores: np.ndarray, p_tail: float, tail: np.ndarray, k: int, lam: float
) -> np.ndarray:
    s = _normalised(scores)
    is_tail = tail[items.clip(min=0)]

    def gain(chosen: list[int], remaining: np.ndarray) -> np.ndarray:
        tail_share = float(is_tail[chosen].mean()) if chosen else 0.0
        head_share = 1 - tail_share if chosen else 0.0
        diversity = np.where(
            is_tail[remaining], p_tail * (1 - tail_share), (1 - p_tail) * (1 - head_share)
        )
        return (1 - lam) * s[remaining] + lam * diversity

    return _greedy(items, k, gain)


def calibrated_reranker(
    split: Histories, genres: np.ndarray, k: int, lam: float, alpha: float = 0.01
) -> Reranker:
    """Steck, "Calibrated recommendations" (RecSys 2018): maximise
    (1 − λ)·Σ score − λ·KL(p || q̃) over the list, p the genre distribution of the user's
    history, q̃ = (1 − α)·q + α·p that of the list. ``genres``: p(genre | item) [items, G]."""

    def rerank(
        users: np.ndarray, stage: Stage, items: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        out = items.copy()
        for row, user in enumerate(users):
            mass = genres[split.history(int(user), stage)[0]].sum(axis=0)
            if mass.sum() > 0 and lam > 0:
                out[row] = _calibrated_list(
                    items[row], scores[row], mass / mass.sum(), genres, k, lam, alpha
                )
        return out

    return rerank


def long_tail_reranker(
    split: Histories, tail: np.ndarray, k: int, lam: float, personalised: bool = False
) -> Reranker:
    """xQuAD over {head, tail} (Abdollahpouri, Burke, Mobasher, FLAIRS 2019), smooth variant:
    maximise (1 − λ)·score(i) + λ·Σ_c P(c|u)·[i ∈ c]·(1 − share of c already in the list).
    ``personalised``: P(c|u) is the share of the user's history in c (lists move towards the
    user's own taste for niche items, which can also lower tail exposure); otherwise
    P(c|u) = ½ (lists move towards equal head and tail exposure)."""

    def rerank(
        users: np.ndarray, stage: Stage, items: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        out = items.copy()
        for row, user in enumerate(users):
            history = split.history(int(user), stage)[0]
            if len(history) and lam > 0:
                p_tail = float(tail[history].mean()) if personalised else 0.5
                out[row] = _long_tail_list(items[row], scores[row], p_tail, tail, k, lam)
        return out

    return rerank


# Registered by name, as the audit config selects them.
RERANKERS: dict[str, Callable[..., Reranker]] = {
    "calibrated": calibrated_reranker,
    "long-tail": long_tail_reranker,
    "long-tail-personal": functools.partial(long_tail_reranker, personalised=True),
}
