"""Ranking distillation (DLLM2Rec, Cui et al. 2024): a teacher recommender's ranked lists teach a
sequential student.

The teacher (the LLM recommender) ranks the next item after each user's training history; the
student (HSTU, SASRec) is trained on its own next-item loss plus, at that same position, a
loss towards the teacher's top-K items weighted by rank, ``w_r ∝ exp(-r / decay)``, plus a
weight for the items the student already ranks in its top K. These are DLLM2Rec's position-
and consistency-aware weights; its confidence weight (the distance between what the LLM
generated and the item it was grounded to: constrained decoding generates only real items) and
its embedding distillation are not implemented. The lists are saved once (the
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

DISTILL_LOSSES = ("softmax", "pointwise")


@dataclass
class DistillConfig:
    """``teacher``: a lists file written by ``TeacherLists.save`` (empty: no distillation);
    ``weight``: λ of the distillation term next to the student's own loss; ``top_k``: how many
    of the teacher's items are used; ``decay``: rank weights ``exp(-r / decay)``;
    ``consistency``: extra weight of a teacher item the student already ranks in its own top
    ``top_k`` (DLLM2Rec's consistency weight; 0: none); ``loss``: ``softmax`` (cross-entropy
    of the student's softmax over all items toward the teacher's items) or ``pointwise``
    (DLLM2Rec's form: ``-log σ(logit)`` of each teacher item, which raises them without
    pushing every other item down)."""

    teacher: str = ""
    weight: float = 1.0
    top_k: int = 10
    decay: float = 5.0
    consistency: float = 0.0
    loss: str = "softmax"

    def __post_init__(self) -> None:
        if self.weight < 0 or self.top_k < 1 or self.decay <= 0 or self.consistency < 0:
            raise ValueError(
                "train.distill: weight >= 0, top_k >= 1, decay > 0 and consistency >= 0"
            )
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"train.distill.loss must be one of {DISTILL_LOSSES}")


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
                "`python simulations/bench_llm.py teacher --lists ...` or "
                "`python simulations/teacher_lists.py`)"
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


def item_weights(
    logits: torch.Tensor, teacher: torch.Tensor, decay: float, consistency: float
) -> torch.Tensor:
    """``[B, K]``: each teacher item's weight, ``exp(-r / decay)`` (normalised over ranks)
    plus ``consistency`` if the student's own top K (``logits``, not differentiated) holds it,
    renormalised over the user's listed items (``teacher`` -1 = none; all 0 for a user with
    none)."""
    rows, k = teacher.shape
    weights = rank_weights(k, decay).to(logits.device).expand(rows, k)
    if consistency:
        own = logits.detach().topk(k, dim=1).indices
        shared = (teacher.unsqueeze(2) == own.unsqueeze(1)).any(dim=2)
        weights = weights + consistency * shared
    weights = weights * (teacher >= 0)
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)


def distillation_losses(
    logits: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, loss: str = "softmax"
) -> torch.Tensor:
    """``[B]``: ``-Σ_r w_r log p_r`` per user, where ``p_r`` is the student's softmax
    probability of teacher item r (``softmax``) or the sigmoid of its logit (``pointwise``).

    ``logits`` ``[B, N]`` over all items; ``teacher`` ``[B, K]`` item indices (-1 = none);
    ``weights`` ``[B, K]`` (``item_weights``: 0 where nothing is listed)."""
    index = teacher.clamp(min=0)
    if loss == "softmax":
        picked = F.log_softmax(logits, dim=-1).gather(1, index)
    else:
        picked = F.logsigmoid(logits.gather(1, index))
    return -(weights * picked).sum(dim=1)
