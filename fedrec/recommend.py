"""``fedrec recommend``: one user's top-K titles from a finished LLM run's global adapters, with
that user's personal prompt when their device (here: the run folder) holds one; and the LLM
recommender as a source of ``fedrec serve``'s funnel."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from fedrec.config import parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecDataError
from fedrec.federation.layout import CATALOGUE_FILE, client_paths
from fedrec.federation.model import PersonalFile
from fedrec.llm_rec.federated import (
    LLMFederatedModel,
    foundation_folder,
    new_llm_model,
)
from fedrec.llm_rec.foundation import item_titles
from fedrec.llm_rec.model import global_state
from fedrec.population import Population, population_of
from fedrec.serving.bundle import ModelBundle, foundation_digest
from fedrec.serving.funnel import Source
from fedrec.serving.service import LLMSourceBuilder
from fedrec.serving.sources import llm_source


def load_run(run_dir: Path) -> Population:
    """The population of a finished LLM run, from the config its ``results.json`` records."""
    results = run_dir / "results.json"
    if not results.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json; is this a finished run folder?")
    config = parse_config(json.loads(results.read_text("utf-8"))["config"], str(results))
    if config.llm is None:
        raise ValueError(f"{run_dir}: not an LLM run (its config has no llm section)")
    return population_of(config)


def global_model(population: Population, run_dir: Path) -> LLMFederatedModel:
    """The run's foundation with its global adapters (read from ``RUN/global``, PEFT format)."""
    llm, seed = population.config.llm, population.config.seed
    assert llm is not None
    catalogue = ItemCatalogue.load(run_dir / CATALOGUE_FILE)
    wrapper = new_llm_model(llm, catalogue, seed, foundation_folder(llm, run_dir))
    wrapper.load_shared_state(global_state(run_dir / "global", len(wrapper.model.scenario_prompts)))
    return wrapper


def recommend(run_dir: Path, raw_user: str, k: int = 10) -> dict[str, Any]:
    size = ItemCatalogue.load(run_dir / CATALOGUE_FILE).num_items
    if not 1 <= k <= size:
        raise ValueError(f"--k must lie in 1..{size} (the run's catalogue), got {k}")
    population = load_run(run_dir)
    dataset, split, partitions = population.dataset, population.split, population.partitions
    users = {str(u): i for i, u in enumerate(dataset.raw_user_ids)}
    if raw_user not in users:
        name = population.config.data.name or "the data"
        raise ValueError(f"user {raw_user!r} is not in {name}")
    user = users[raw_user]
    model = global_model(population, run_dir).model
    partition = next(p for p, members in enumerate(partitions) if user in members)
    personal = client_paths(run_dir, {"partition-id": partition})[3]
    state = PersonalFile(personal).load()
    model.load_personal_state(state)
    items, times = split.full(user)
    top = model.top_unseen(items, times, k, dataset.num_items)
    titles = item_titles(dataset)
    return {
        "user": raw_user,
        "personal_prompt": str(personal) if state is not None else None,
        "scenario": int(model.builder.scenario(times)),
        "history": [titles[i] for i in items[-5:].tolist()],
        "top": [
            {"item": str(dataset.raw_item_ids[i]), "title": titles[i], "log_prob": s}
            for i, s in top
        ],
    }


def foundation_llm_source(foundation: Path) -> LLMSourceBuilder:
    """What builds the ``llm`` source of a serving bundle's LLM federation round: the
    foundation in ``foundation`` (its digest must be the one the round names) with the round's
    adapters, on the service's device."""

    def build(round_bundle: ModelBundle, device: torch.device, n: int) -> Source:
        if foundation_digest(foundation) != round_bundle.foundation_hash:
            raise FedrecDataError(
                f"the bundle's LLM adapters were trained on foundation "
                f"{round_bundle.foundation_hash[:12]}, not this one: copy the federation's "
                "foundation folder",
                foundation,
            )
        config = parse_config(
            yaml.safe_load(round_bundle.config) or {}, "the LLM round's config", round_bundle.config
        )
        assert config.llm is not None
        catalogue = ItemCatalogue.from_text(round_bundle.catalogue, "the LLM round's catalogue")
        wrapper = new_llm_model(config.llm, catalogue, config.seed, foundation)
        wrapper.load_shared_state(round_bundle.state)
        model = copy.deepcopy(wrapper.model).to(device).eval()  # the foundation is cached
        model.load_personal_state(None)  # a user's own prompt never leaves their device
        return llm_source(model, n)

    return build
