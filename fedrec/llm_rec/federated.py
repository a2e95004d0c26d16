"""The LLM recommender as a federation's model: only adapters cross the network, the personal
prompt stays in the client's own folder, the backbone is loaded once per process."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.evaluator import Scorer
from fedrec.federation import LOCAL_OPTIMIZERS, FederatedConfig, LocalResult, Population
from fedrec.llm_rec.foundation import Foundation, load_foundation, run_foundation
from fedrec.llm_rec.model import LLMRecommender, example_losses, score_matrix
from fedrec.privacy.dp_sgd import dp_train
from fedrec.training import trainable_users

log = logging.getLogger("fedrec.llm_rec")


def foundation_folder(population: Population, run_dir: Path) -> Path:
    llm = population.config.llm
    assert llm is not None
    return Path(llm.foundation_dir) if llm.foundation_dir else run_dir / "foundation"


def ensure_foundation(population: Population, run_dir: Path, progress: bool = True) -> Path:
    """The server's foundation stage: build the backbone once, reuse it afterwards."""
    folder = foundation_folder(population, run_dir)
    meta_path = folder / "foundation.json"
    if not meta_path.exists():
        log.info("foundation stage: pretraining the backbone on public data into %s", folder)
        run_foundation(population.config, population.dataset, population.split, folder, progress)
        return folder
    llm = population.config.llm
    assert llm is not None
    meta = json.loads(meta_path.read_text("utf-8"))
    if "backbone" in meta and not llm.base_model and meta["backbone"] != asdict(llm.backbone):
        raise ValueError(
            f"{folder} holds a foundation built with llm.backbone {meta['backbone']}, the config "
            f"asks for {asdict(llm.backbone)}: set llm.foundation_dir to a new folder (or delete "
            "this one) to build a matching foundation"
        )
    return folder


@functools.lru_cache(maxsize=2)
def _foundation(folder: Path) -> Foundation:
    return load_foundation(folder)


def load_personal(path: Path | None) -> dict[str, torch.Tensor] | None:
    return load_file(path) if path is not None and path.exists() else None


class LLMFederatedModel:
    """``fedrec.federation.FederatedModel`` for the LLM recommender."""

    def __init__(self, model: LLMRecommender, foundation: Foundation):
        self.model = model
        self.foundation = foundation

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.model.shared_state()

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_shared_state(state)

    def to(self, device: torch.device) -> LLMFederatedModel:
        self.model.to(device)
        return self

    def scorer(
        self, split: SequenceSplit, device: torch.device, personal: Path | None = None
    ) -> Scorer:
        """Scores from constrained beam search (see ``score_matrix``); with the personal prompt
        in ``personal`` (one user's), else the initial prompt every new user starts from."""
        model, config = self.model, self.model.config

        def score(users: np.ndarray, stage: Stage) -> torch.Tensor:
            model.load_personal_state(load_personal(personal))
            found = []
            for lo in range(0, len(users), config.eval_batch_size):
                ids, mask, _, scenario = model.builder.requests(
                    split, users[lo : lo + config.eval_batch_size], stage
                ).tensors
                found += model.generate(
                    ids.to(device), mask.to(device), scenario.to(device), config.beam_width
                )
            return score_matrix(found, split.num_items).to(device)

        return score

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int:
        window = fed.record_window if fed.partitioning == "user" else None
        return len(
            self.model.builder.records(split, trainable_users(split), window, fed.record_period)
        )

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: Path | None,
        noise_seed: int | None = None,
    ) -> LocalResult:
        """Train adapters, scenario prompts and the personal prompt on this client's records;
        the personal prompt is saved back to ``personal`` (it never leaves the device)."""
        model = self.model
        users = trainable_users(split)
        if not len(users):
            return LocalResult(0, math.nan, None)
        torch.manual_seed(seed)
        model.load_personal_state(load_personal(personal))
        window = fed.record_window if fed.partitioning == "user" else None
        examples = model.builder.records(split, users, window, _period(fed))
        if not len(examples):  # no period with two events: nothing to learn from
            return LocalResult(0, math.nan, None)
        params = model.trainable_parameters()
        optimizer = LOCAL_OPTIMIZERS[fed.local_optimizer](params, lr=fed.local_learning_rate)
        model.train()
        if fed.record_dp is not None:
            result = dp_train(
                model,
                examples,
                fed.record_dp,
                fed.local_epochs,
                fed.local_learning_rate,
                optimizer=optimizer,
                loss_fn=example_losses,
                noise_seed=noise_seed,
                rounds=fed.num_rounds,
            )
            loss, dp = result.mean_loss, result
        else:
            generator = torch.Generator().manual_seed(seed)
            losses = []
            for _ in range(fed.local_epochs):
                for batch in torch.randperm(len(examples), generator=generator).split(
                    fed.local_batch_size
                ):
                    step_loss = model.per_example_loss(*(t[batch] for t in examples.tensors))
                    optimizer.zero_grad(set_to_none=True)
                    step_loss.mean().backward()
                    optimizer.step()
                    losses.append(step_loss.mean().item())
            loss, dp = float(np.mean(losses)), None
        model.eval()
        if personal is not None and model.personal_prompt is not None:
            personal.parent.mkdir(parents=True, exist_ok=True)
            tmp = personal.with_suffix(".tmp")
            save_file(model.personal_state(), tmp)
            os.replace(tmp, personal)
        return LocalResult(len(examples), loss, dp)

    def export(self, folder: Path) -> None:
        """The global adapters in PEFT format under ``folder / "global"``."""
        self.model.save_global(folder / "global", str(self.foundation.folder / "backbone"))


def _period(fed: FederatedConfig) -> int | None:
    """Day records under record-level DP (the unit of its ε); without it every event is used."""
    return fed.record_period if fed.record_dp is not None else None


_PROCESS_MODEL: dict[tuple[int, Path], LLMFederatedModel] = {}


def llm_federated_model(population: Population, run_dir: Path, cached: bool) -> LLMFederatedModel:
    """A fresh model (server, in-process loop), or with ``cached`` this process' one (clients:
    the backbone is loaded once and only adapter tensors change between messages)."""
    folder = foundation_folder(population, run_dir)
    if not cached:
        return new_llm_model(population, folder)
    key = (id(population), folder)  # load_population keeps one Population per process
    if key not in _PROCESS_MODEL:
        _PROCESS_MODEL.clear()
        _PROCESS_MODEL[key] = new_llm_model(population, folder)
    return _PROCESS_MODEL[key]


def new_llm_model(population: Population, folder: Path) -> LLMFederatedModel:
    config = population.config
    assert config.llm is not None
    foundation = _foundation(folder)
    model = foundation.recommender(config.llm, population.dataset, config.seed)
    return LLMFederatedModel(model, foundation)
