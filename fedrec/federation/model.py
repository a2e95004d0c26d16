"""What a federation trains (``FederatedModel``) and local training of a sequential model.

A new kind of federated model is one class implementing ``FederatedModel`` plus one entry in
``fedrec.federated_models.FEDERATED_MODEL_KINDS``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedrec.data.split import SequenceSplit
from fedrec.evaluation.evaluator import Scorer
from fedrec.federation.config import LOCAL_OPTIMIZERS, FederatedConfig
from fedrec.federation.records import dp_records
from fedrec.models.base import SequentialRecommender
from fedrec.privacy.dp_sgd import DPTrainResult, dp_train
from fedrec.training import model_scorer, train_epoch, trainable_users


@dataclass
class LocalResult:
    num_examples: int
    loss: float
    dp: DPTrainResult | None


class PersonalParameters(Protocol):
    """Where a client keeps its personal parameters (the LLM recommender's personal prompt),
    which never leave it: a file on a simulated device, the encrypted store on a real one."""

    def load(self) -> dict[str, torch.Tensor] | None: ...

    def save(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class PersonalFile:
    """Personal parameters in a safetensors file, written atomically, owner-only."""

    path: Path

    def load(self) -> dict[str, torch.Tensor] | None:
        return load_file(self.path) if self.path.exists() else None

    def save(self, state: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(state, tmp)
        tmp.chmod(0o600)  # the user's own parameters: readable by the device's owner only
        os.replace(tmp, self.path)


class FederatedModel(Protocol):
    """What a federation trains. ``shared_state`` names every tensor that crosses the network
    (the whole sequential model, or only the LLM recommender's adapters); personal state (a
    user's own prompt) is kept in the client's ``personal`` parameters and never in it."""

    def shared_state(self) -> dict[str, torch.Tensor]: ...

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def to(self, device: torch.device) -> FederatedModel: ...

    def scorer(self, split: SequenceSplit, device: torch.device) -> Scorer: ...

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: PersonalParameters | None,
        noise_seed: int | None = None,
    ) -> LocalResult: ...

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int: ...

    def export(self, folder: Path) -> None: ...


def local_train(
    model: SequentialRecommender,
    split: SequenceSplit,
    config: FederatedConfig,
    seed: int,
    noise_seed: int | None = None,
) -> LocalResult:
    """Train ``model`` in place on one client's sequences (all of ``split``). ``seed`` drives
    dropout and negatives; DP noise is private unless ``noise_seed`` (reproducible mode)."""
    users = trainable_users(split)
    if not len(users):
        return LocalResult(0, math.nan, None)
    # Dropout and negative sampling only: no DP mechanism reads this stream (DP-SGD's noise and
    # Poisson masks come from fedrec.privacy.randomness, private unless noise_seed is given).
    torch.manual_seed(seed)
    model.train()  # a client's model may have just been evaluated (one model per process)
    optimizer = LOCAL_OPTIMIZERS[config.local_optimizer](
        model.parameters(), lr=config.local_learning_rate
    )
    if config.record_dp is not None:
        examples = dp_records(split, users, config, model.config.max_len)
        if not len(examples):
            return LocalResult(0, math.nan, None)
        result = dp_train(
            model,
            examples,
            config.record_dp,
            config.local_epochs,
            config.local_learning_rate,
            optimizer=optimizer,
            noise_seed=noise_seed,
            rounds=config.num_rounds,
        )
        return LocalResult(len(examples), result.mean_loss, result)
    rng = np.random.default_rng(seed)
    losses = [
        train_epoch(
            model, optimizer, split, users, config.local_batch_size, rng, torch.device("cpu")
        )
        for _ in range(config.local_epochs)
    ]
    return LocalResult(training_positions(split, users), float(np.mean(losses)), None)


def training_positions(split: SequenceSplit, users: np.ndarray) -> int:
    """The (input, next item) pairs of ``users``' training histories: a client's weight."""
    return int(np.maximum(split.history_lengths("valid")[users] - 1, 0).sum())


class SequentialFederatedModel:
    """A sequential recommender (HSTU, SASRec) trained whole by the federation."""

    def __init__(self, model: SequentialRecommender):
        self.model = model

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def to(self, device: torch.device) -> SequentialFederatedModel:
        self.model.to(device)
        return self

    def scorer(self, split: SequenceSplit, device: torch.device) -> Scorer:
        return model_scorer(self.model, split, device)

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: PersonalParameters | None,
        noise_seed: int | None = None,
    ) -> LocalResult:
        return local_train(self.model, split, fed, seed, noise_seed)

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int:
        return len(dp_records(split, trainable_users(split), fed, self.model.config.max_len))

    def export(self, folder: Path) -> None:
        torch.save(self.model.state_dict(), folder / "model.pt")
