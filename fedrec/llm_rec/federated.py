"""The LLM recommender as a federation's model: only adapters cross the network, the personal
prompt stays in the client's own folder, the backbone is loaded once per process (clients
keep one model per process and load only adapter tensors between messages)."""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.evaluator import Scorer
from fedrec.federation.config import LOCAL_OPTIMIZERS, FederatedConfig
from fedrec.federation.model import LocalResult, PersonalParameters
from fedrec.federation.records import record_shape
from fedrec.federation.vectorised import ShardResult
from fedrec.llm_rec.config import LLMRecConfig
from fedrec.llm_rec.foundation import (
    Foundation,
    catalogue_titles,
    check_title_style,
    load_foundation,
    run_foundation,
)
from fedrec.llm_rec.model import LLMRecommender, example_losses, prompt_rows, score_matrix
from fedrec.privacy.dp_sgd import dp_train, ignore_harmless_opacus_warnings
from fedrec.semantic_id.pipeline import SemanticIdConfig
from fedrec.training import trainable_users

log = logging.getLogger("fedrec.llm_rec")


def foundation_folder(llm: LLMRecConfig, run_dir: Path) -> Path:
    return Path(llm.foundation_dir) if llm.foundation_dir else run_dir / "foundation"


def ensure_foundation(
    llm: LLMRecConfig,
    semantic_id: SemanticIdConfig,
    seed: int,
    dataset: InteractionDataset,
    split: SequenceSplit,
    run_dir: Path,
    progress: bool = True,
) -> Path:
    """The server's foundation stage: build the backbone once, reuse it afterwards."""
    folder = foundation_folder(llm, run_dir)
    meta_path = folder / "foundation.json"
    if not meta_path.exists():
        log.info("foundation stage: pretraining the backbone on public data into %s", folder)
        run_foundation(llm, semantic_id, seed, dataset, split, folder, progress)
        return folder
    meta = json.loads(meta_path.read_text("utf-8"))
    if "backbone" in meta and not llm.base_model and meta["backbone"] != asdict(llm.backbone):
        raise ValueError(
            f"{folder} holds a foundation built with llm.backbone {meta['backbone']}, the config "
            f"asks for {asdict(llm.backbone)}: set llm.foundation_dir to a new folder (or delete "
            "this one) to build a matching foundation"
        )
    check_title_style(meta, llm, folder)
    return folder


@functools.lru_cache(maxsize=2)
def _foundation(folder: Path) -> Foundation:
    return load_foundation(folder)


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
        self,
        split: SequenceSplit,
        device: torch.device,
        personal: PersonalParameters | None = None,
    ) -> Scorer:
        """Scores from constrained beam search (see ``score_matrix``); with the personal prompt
        in ``personal`` (one user's), else the initial prompt every new user starts from."""
        model, config = self.model, self.model.config

        def score(users: np.ndarray, stage: Stage) -> torch.Tensor:
            model.load_personal_state(None if personal is None else personal.load())
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
        shape = record_shape(fed)
        return len(
            self.model.builder.records(split, trainable_users(split), shape.window, shape.period)
        )

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: PersonalParameters | None,
        noise_seed: int | None = None,
    ) -> LocalResult:
        """Train adapters, scenario prompts and the personal prompt on this client's records;
        the personal prompt is saved back to ``personal`` (it never leaves the device)."""
        model = self.model
        users = trainable_users(split)
        if not len(users):
            return LocalResult(0, math.nan, None)
        torch.manual_seed(seed)
        own = None if personal is None else personal.load()
        if own is None and model.config.prompts.personal_init == "history":
            own = model.history_personal_state(
                np.concatenate([split.train_sequence(int(u))[0] for u in users])
            )
        model.load_personal_state(own)
        shape = record_shape(fed)
        # Without DP a record's period plays no part: every event is used.
        period = shape.period if fed.record_dp is not None else None
        examples = model.builder.records(split, users, shape.window, period)
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
        if model.config.prompts.personal_steps:
            fit_personal_prompt(model, examples, fed.local_batch_size, seed)
        model.eval()
        if personal is not None and model.personal_prompt is not None:
            personal.save(model.personal_state())
        return LocalResult(len(examples), loss, dp)

    def why_not_fedsgd_shard(self) -> str | None:
        if self.model.personal_prompt is not None:
            return (
                "the LLM recommender's personal prompts are trained in each client's own loop "
                "(llm.prompts.personal_tokens: 0 batches the clients)"
            )
        return None

    def fedsgd_shard(
        self,
        splits: Sequence[SequenceSplit],
        fed: FederatedConfig,
        seeds: Sequence[int],
        chunk: int = 64,
    ) -> ShardResult | None:
        """Each client's adapters after its FedSGD step, as ``train_local`` would leave them:
        with one record per client that step is the record's gradient, so the shard's steps
        are per-example gradients of one batched pass (Opacus' ``GradSampleModule`` hooks, the
        per-sample gradients DP-SGD here is tested with). None when some client has several
        records (its step averages them: the per-client loop trains it). No randomness: the
        adapters have no dropout, so ``seeds`` play no part."""
        builder, window = self.model.builder, record_shape(fed).window
        rows = []
        for split in splits:
            own = builder.record_rows(split, trainable_users(split), window, None)
            if len(own) > 1:
                return None
            rows.append(own)
        training = [i for i, own in enumerate(rows) if own]
        params = self.model.shared_parameters()
        start = {k: v.detach().clone() for k, v in params.items()}
        results: dict[int, tuple[dict[str, torch.Tensor], LocalResult]] = {}
        self.model.train()
        hooks = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")
        try:
            for lo in range(0, len(training), chunk):
                part = training[lo : lo + chunk]
                batch = builder.tensors([rows[i][0] for i in part]).tensors
                losses = self.model.per_example_loss(*batch)
                with warnings.catch_warnings():
                    ignore_harmless_opacus_warnings()
                    losses.sum().backward()
                losses = losses.detach()
                for row, i in enumerate(part):
                    state = {
                        k: start[k] - fed.local_learning_rate * p.grad_sample[row]  # type: ignore[attr-defined]
                        for k, p in params.items()
                    }
                    results[i] = (state, LocalResult(1, float(losses[row]), None))
                for p in params.values():
                    p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        finally:
            hooks._close()
            self.model.eval()
        return [
            results.get(i, (dict(start), LocalResult(0, math.nan, None)))
            for i in range(len(splits))
        ]

    def export(self, folder: Path) -> None:
        """The global adapters in PEFT format under ``folder / "global"``."""
        self.model.save_global(folder / "global", str(self.foundation.folder / "backbone"))


def fit_personal_prompt(
    model: LLMRecommender, examples: TensorDataset, batch_size: int, seed: int
) -> None:
    """``prompts.personal_steps`` epochs of Adam on the personal prompt alone, the adapters
    fixed: the joint step moves it as little as the shared adapters (measured: no gain from it,
    BENCHMARKS.md), so it gets its own steps and learning rate. Only the prompt's gradient is
    computed (``autograd.grad``), never the adapters'."""
    if model.personal_prompt is None:
        return
    options = model.config.prompts
    rows = prompt_rows(model.personal_prompt)
    optimizer = torch.optim.Adam([rows], lr=options.personal_learning_rate)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(options.personal_steps):
        for batch in torch.randperm(len(examples), generator=generator).split(batch_size):
            loss = model.per_example_loss(*(t[batch] for t in examples.tensors)).mean()
            (rows.grad,) = torch.autograd.grad(loss, [rows])
            optimizer.step()


def new_llm_model(
    llm: LLMRecConfig, catalogue: ItemCatalogue, seed: int, folder: Path
) -> LLMFederatedModel:
    """The foundation in ``folder`` (loaded once per process) with fresh adapters, for the
    items of ``catalogue``."""
    foundation = _foundation(folder)
    model = foundation.recommender(llm, catalogue_titles(catalogue, llm.title_style), seed)
    return LLMFederatedModel(model, foundation)
