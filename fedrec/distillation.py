"""Ranking distillation (DLLM2Rec, Cui et al. 2024): a teacher recommender's ranked lists teach a
sequential student.

The teacher (the LLM recommender) ranks the next item after each user's training history; the
student (HSTU, SASRec) is trained on its own next-item loss plus, at that same position, a
cross-entropy towards the teacher's top-K items weighted by rank, ``w_r ∝ exp(-r / decay)``.
This is DLLM2Rec's position-aware ranking distillation; its confidence and consistency
weights and its embedding distillation are not implemented. The lists are saved once (the
teacher is slow, the student's epochs are not) and hold only what the teacher could compute
from training data: its input is the training history, and the validation and test items are
never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.data.split import SequenceSplit
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.evaluation.evaluator import Scorer


@dataclass
class DistillConfig:
    """``teacher``: a lists file written by ``TeacherLists.save`` (empty: no distillation);
    ``weight``: λ of the distillation term next to the student's own loss; ``top_k``: how many
    of the teacher's items are used; ``decay``: rank weights ``exp(-r / decay)``."""

    teacher: str = ""
    weight: float = 1.0
    top_k: int = 10
    decay: float = 5.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.top_k < 1 or self.decay <= 0:
            raise ValueError("train.distill: weight >= 0, top_k >= 1 and decay > 0")


@dataclass(frozen=True)
class TeacherLists:
    """``items[u]``: the teacher's ranking (item indices, best first, -1 = none) of the item
    after user ``u``'s training history; ``source`` names the teacher."""

    items: np.ndarray
    source: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(handle, items=self.items, source=np.array(json.dumps(self.source)))

    @classmethod
    def load(cls, path: Path, split: SequenceSplit) -> TeacherLists:
        if not path.is_file():
            raise FileNotFoundError(
                f"train.distill.teacher: no teacher lists at {path} (write them with "
                "`python simulations/bench_distill.py teacher`)"
            )
        with np.load(path) as data:
            items, source = data["items"], json.loads(str(data["source"]))
        if items.ndim != 2 or len(items) != split.num_users or items.max() >= split.num_items:
            raise ValueError(
                f"{path}: lists of shape {items.shape} (max item {items.max()}) do not fit "
                f"this data ({split.num_users} users, {split.num_items} items)"
            )
        return cls(items.astype(np.int64), source)


def teacher_lists(scorer: Scorer, split: SequenceSplit, top_k: int, source: str) -> TeacherLists:
    """The teacher's top-``top_k`` unseen items after every user's training history (the
    validation position's input; the evaluator's ranking, history excluded)."""
    ranked = evaluate(scorer, split, "valid", EvalConfig(ks=(min(10, top_k),)), top_n=top_k)
    return TeacherLists(ranked.top_items, source)


def rank_weights(top_k: int, decay: float) -> torch.Tensor:
    """``[top_k]``: ``exp(-r / decay)`` for ranks r = 0..top_k-1, summing to 1."""
    weights = torch.exp(-torch.arange(top_k, dtype=torch.float32) / decay)
    return weights / weights.sum()


def distillation_losses(
    logits: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``[B]``: ``-Σ_r w_r log softmax(logits)[teacher_r]`` per user, the weights renormalised
    over the user's listed items (``teacher`` -1 = none; a user with none gets 0).

    ``logits`` ``[B, N]`` over all items; ``teacher`` ``[B, K]`` item indices; ``weights``
    ``[K]``."""
    listed = teacher >= 0
    log_probs = F.log_softmax(logits, dim=-1).gather(1, teacher.clamp(min=0))
    w = weights.to(logits.device) * listed
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return -(w * log_probs).sum(dim=1)
