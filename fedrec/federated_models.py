"""Federated model kinds by name: what ``ExperimentConfig.federated_model_kind`` builds.

A kind is a function of the experiment config, the published item catalogue and the run folder
returning a ``fedrec.federation.FederatedModel``; a new kind is one class plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedrec.config import ExperimentConfig
from fedrec.data.catalogue import ItemCatalogue
from fedrec.federation.model import FederatedModel, SequentialFederatedModel
from fedrec.llm_rec.federated import foundation_folder, new_llm_model
from fedrec.models import build_model
from fedrec.serving.federated import ranking_model
from fedrec.training import seed_everything

FederatedModelBuilder = Callable[[ExperimentConfig, ItemCatalogue, Path], FederatedModel]


def _sequential(
    config: ExperimentConfig, catalogue: ItemCatalogue, run_dir: Path
) -> FederatedModel:
    return SequentialFederatedModel(
        build_model(config.model_name, catalogue.num_items, config.model)
    )


def _llm(config: ExperimentConfig, catalogue: ItemCatalogue, run_dir: Path) -> FederatedModel:
    """Its foundation must exist (the server's foundation stage: ``Population.publish``)."""
    assert config.llm is not None
    return new_llm_model(config.llm, catalogue, config.seed, foundation_folder(config.llm, run_dir))


def _ranking(config: ExperimentConfig, catalogue: ItemCatalogue, run_dir: Path) -> FederatedModel:
    """Its retrieval bundle must exist on the node (``ranking.retrieval``)."""
    assert config.ranking is not None
    return ranking_model(config.ranking, catalogue)


FEDERATED_MODEL_KINDS: dict[str, FederatedModelBuilder] = {
    "sequential": _sequential,
    "llm": _llm,
    "ranking": _ranking,
}


def build_federated_model(
    config: ExperimentConfig, catalogue: ItemCatalogue, run_dir: Path
) -> FederatedModel:
    """A fresh model of the config's kind for the items of ``catalogue``."""
    if config.train.distill.teacher:
        raise ValueError(
            "train.distill.teacher: distillation runs in centralized training (fedrec train); "
            "a federation's local training reads no teacher, so it would be ignored: remove "
            "train.distill from a federated run"
        )
    return FEDERATED_MODEL_KINDS[config.federated_model_kind](config, catalogue, run_dir)


def initial_federated_model(
    config: ExperimentConfig, catalogue: ItemCatalogue, run_dir: Path
) -> FederatedModel:
    """The global model a federation of ``config`` starts from (the server's round 0): its
    initialisation is seeded, so anyone with the config and the catalogue can rebuild it."""
    seed_everything(config.seed)
    return build_federated_model(config, catalogue, run_dir)
