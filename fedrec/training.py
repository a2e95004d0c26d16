"""Local training loop shared by the centralized trainer and (later) federated clients."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedrec.data.batching import history_batch, training_batch
from fedrec.data.split import SequenceSplit, Stage
from fedrec.distillation import DistillConfig, TeacherLists, distillation_losses, item_weights
from fedrec.evaluation import EvalConfig, EvalResult, evaluate, metric_names
from fedrec.evaluation.evaluator import Scorer
from fedrec.files import save_atomic
from fedrec.models.base import SequentialRecommender

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Optimisation and model selection.

    Validation runs every ``eval_every`` epochs; training stops after ``patience`` validations
    without improvement of ``monitor`` and the best validated weights are restored.
    ``distill``: a teacher's ranked lists as a second loss (``fedrec.distillation``).
    """

    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 5
    patience: int = 4
    monitor: str = "NDCG@10"
    device: str = "auto"
    num_threads: int = 0
    progress: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("train: epochs, batch_size, eval_every and patience must be >= 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("train: learning_rate must be > 0 and weight_decay >= 0")
        if self.device not in DEVICES:
            raise ValueError(f"train.device must be one of {DEVICES}, got {self.device!r}")
        if self.num_threads < 0:
            raise ValueError("train.num_threads must be >= 0 (0 keeps torch's default)")


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    epochs_run: int
    seconds_per_epoch: float
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but CUDA is not available; use device: auto or cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_users(split: SequenceSplit) -> np.ndarray:
    """Users whose training history holds at least one (input, next item) pair."""
    return np.flatnonzero(split.history_lengths("valid") >= 2)


def model_scorer(
    model: SequentialRecommender, split: SequenceSplit, device: torch.device
) -> Scorer:
    def score(users: np.ndarray, stage: Stage) -> torch.Tensor:
        model.eval()
        items, times = history_batch(split, users, stage, model.config.max_len)
        return model.score_all(items.to(device), times.to(device))

    return score


@dataclass(frozen=True)
class Teacher:
    """A teacher's lists as the student's second loss, at the position after each user's
    training history (where the lists rank; ``fedrec.distillation``)."""

    lists: TeacherLists
    config: DistillConfig

    def loss(
        self,
        model: SequentialRecommender,
        split: SequenceSplit,
        users: np.ndarray,
        device: torch.device,
    ) -> torch.Tensor:
        items, times = history_batch(split, users, "valid", model.config.max_len)
        logits = model.score_all(items.to(device), times.to(device)) / model.config.temperature
        config = self.config
        listed = torch.from_numpy(self.lists.items[users, : config.top_k]).to(device)
        weights = item_weights(logits, listed, config.decay, config.consistency)
        losses = distillation_losses(logits, listed, weights, config.loss)
        return config.weight * losses.mean()


def train_epoch(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    split: SequenceSplit,
    users: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    device: torch.device,
    progress: Callable[[float], None] | None = None,
    teacher: Teacher | None = None,
) -> float:
    """One pass over ``users`` in shuffled batches; returns the mean batch loss (with the
    ``teacher``'s distillation term, when given)."""
    model.train()
    order = rng.permutation(users)
    losses = []
    for lo in range(0, len(order), batch_size):
        batch = order[lo : lo + batch_size]
        inputs, times, targets = training_batch(split, batch, model.config.max_len)
        loss = model.loss(inputs.to(device), times.to(device), targets.to(device))
        if teacher is not None:
            loss = loss + teacher.loss(model, split, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(losses[-1])
    return float(np.mean(losses)) if losses else float("nan")


def fit(
    model: SequentialRecommender,
    split: SequenceSplit,
    train: TrainConfig,
    evaluation: EvalConfig,
    seed: int,
    checkpoint: Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    exclude: np.ndarray | None = None,
) -> FitResult:
    """Train with early stopping on validation; leaves the best validated weights in ``model``.
    ``exclude``: a mask of users never trained on (the privacy audit's non-members)."""
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    device = resolve_device(train.device)
    model.to(device)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    users = trainable_users(split)
    if exclude is not None:
        users = users[~exclude[users]]
    if not len(users):
        raise ValueError("no user has two or more training items; nothing to train on")
    if train.monitor not in metric_names(evaluation.ks):
        raise ValueError(
            f"train.monitor {train.monitor!r} is not a reported metric for evaluation.ks {evaluation.ks}"
        )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train.learning_rate,
        betas=(0.9, 0.98),
        weight_decay=train.weight_decay,
    )
    teacher = None
    if train.distill.teacher:
        lists = TeacherLists.load(Path(train.distill.teacher), split)
        teacher = Teacher(lists, train.distill)
        log.info("distilling from %s (%s)", lists.source, train.distill)
    scorer = model_scorer(model, split, device)
    best_score, best_epoch, best_valid, best_state = -1.0, 0, {}, copy.deepcopy(model.state_dict())
    history: list[dict[str, Any]] = []
    stale, epoch_seconds = 0, []
    batches = -(-len(users) // train.batch_size)
    bar = tqdm(
        total=train.epochs * batches, disable=not train.progress, unit="batch", dynamic_ncols=True
    )

    say = bar.write if train.progress else log.info

    def show(value: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)

    for epoch in range(1, train.epochs + 1):
        start = time.perf_counter()
        bar.set_description(f"epoch {epoch}/{train.epochs}")
        loss = train_epoch(
            model,
            optimizer,
            split,
            users,
            train.batch_size,
            rng,
            device,
            progress=show,
            teacher=teacher,
        )
        epoch_seconds.append(time.perf_counter() - start)
        record: dict[str, Any] = {"epoch": epoch, "loss": loss}
        if not math.isfinite(loss):
            history.append(record)
            say(f"epoch {epoch}: loss is {loss}; stopping and keeping the best validated weights")
            break
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            valid = evaluate(scorer, split, "valid", evaluation).metrics
            record["valid"] = valid
            if valid[train.monitor] > best_score:
                best_score, best_epoch, best_valid, stale = valid[train.monitor], epoch, valid, 0
                best_state = copy.deepcopy(model.state_dict())
                if checkpoint is not None:
                    save_atomic(
                        {
                            "model": best_state,
                            "epoch": epoch,
                            "valid": valid,
                            **(checkpoint_extra or {}),
                        },
                        checkpoint,
                    )
            else:
                stale += 1
            say(
                f"epoch {epoch}: loss {loss:.4f}  valid {train.monitor} {valid[train.monitor]:.4f}"
                f"  (best {best_score:.4f} @ {best_epoch})"
            )
        history.append(record)
        if stale >= train.patience:
            say(f"early stop: {train.monitor} did not improve in {train.patience} validations")
            break
    bar.close()
    model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_valid=best_valid,
        epochs_run=len(history),
        seconds_per_epoch=float(np.median(epoch_seconds)),
        history=history,
    )


def evaluate_model(
    model: SequentialRecommender,
    split: SequenceSplit,
    stage: Stage,
    evaluation: EvalConfig,
    device: torch.device,
) -> EvalResult:
    return evaluate(model_scorer(model, split, device), split, stage, evaluation)
