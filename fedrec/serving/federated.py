"""The funnel's ranker as a federated model: devices rank their own retrieval candidates
against their own labels.

Retrieval is frozen and public: a serving bundle (``RankingConfig.retrieval``) holds the
sequential model, the catalogue and, when it has one, the semantic-ID model, as a federation
of the sequential model (``serving:``) or ``simulations/bench_funnel.py --bundle-out`` writes
them. Every node loads the same bundle, verified by its hashes. A client builds its examples
from its own split only: at each of its users' last ``positions`` training positions (before
the validation item, which stays held out), the funnel's candidates from the history before
it, labelled *engage* (the item taken next) and *like* (it, rated ≥ 4); user attributes come
from its own store. Only the ranker's tensors cross the network.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.evaluator import Scorer
from fedrec.federation.config import LOCAL_OPTIMIZERS, FederatedConfig
from fedrec.federation.model import LocalResult, PersonalParameters
from fedrec.models.ranking import TASKS, MultiTaskRanker, ranker_class
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables
from fedrec.serving.funnel import Funnel, FunnelConfig
from fedrec.serving.ranker import (
    ranker_examples,
    ranker_scorer,
    sequential_user_vectors,
    train_ranker,
)
from fedrec.serving.store import (
    ServingBundle,
    ServingConfig,
    bundle_sources,
    load_serving_bundle,
    publish_over_retrieval,
)


@dataclass
class RankingConfig:
    """A federation of the funnel's ranker. ``retrieval``: a serving bundle folder, relative to
    the working directory (its sequential model, catalogue and semantic-ID model retrieve and
    stay frozen; a device uses its own copy, checked by digest); ``positions``:
    training positions per user; ``tasks`` and ``task_weights``: the ranker's tasks and their
    weights in the fused score; ``attributes``: the public vocabulary of each user attribute
    the ranker reads (others are "unknown"); ``retrieve_n``: items per source."""

    retrieval: str = ""
    positions: int = 5
    tasks: tuple[str, ...] = TASKS
    task_weights: dict[str, float] = field(default_factory=lambda: {"engage": 1.0, "like": 0.5})
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    retrieve_n: int = 100

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if not self.retrieval:
            raise ValueError(
                "ranking.retrieval: the serving bundle folder whose retrieval the ranker ranks "
                "(written by a federation with a serving section, or bench_funnel.py --bundle-out)"
            )
        if self.positions < 1 or self.retrieve_n < 1:
            raise ValueError("ranking.positions and ranking.retrieve_n must be >= 1")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise ValueError(f"ranking.tasks: names among {list(TASKS)}, got {list(self.tasks)}")
        for name in self.attributes:
            if name not in USER_ATTRIBUTES:
                close = difflib.get_close_matches(name, USER_ATTRIBUTES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"ranking.attributes: unknown attribute {name!r}{hint}; the ranker reads "
                    f"{list(USER_ATTRIBUTES)}"
                )
        self.attributes = {
            k: tuple(str(v) for v in values) for k, values in self.attributes.items()
        }
        weights = {t: w for t, w in self.task_weights.items() if t in self.tasks}
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(
                f"ranking.task_weights: non-negative, at least one positive among {list(self.tasks)}"
            )


class RankingFederatedModel:
    """The multi-task ranker trained by the federation over a frozen retrieval bundle."""

    def __init__(
        self, config: RankingConfig, catalogue: ItemCatalogue, retrieval: ServingBundle
    ) -> None:
        if retrieval.catalogue.raw_item_ids != catalogue.raw_item_ids:
            raise ValueError(
                f"ranking.retrieval {config.retrieval}: its catalogue "
                f"({retrieval.catalogue.num_items} items) lists other items than the run's "
                f"({catalogue.num_items}): build the bundle from the same data set"
            )
        self.config, self.retrieval = config, retrieval
        self.tables = FeatureTables.build(retrieval.catalogue, config.attributes)
        self.device = torch.device("cpu")
        self._sources()
        spec = self.tables.ranker_config(
            retrieval.sequential.config.embedding_dim,
            len(self.funnel_config.sources),
            tasks=config.tasks,
        )
        self.ranker: MultiTaskRanker = ranker_class("mmoe-dcn")(spec)

    def _sources(self) -> None:
        """The bundle's own funnel sources, in its order, on ``self.device``."""
        self.encoder, every = bundle_sources(self.retrieval, self.device, self.config.retrieve_n)
        named = self.retrieval.funnel
        self.sources = {name: every[name] for name in named.sources}
        self.funnel_config = FunnelConfig(
            sources=named.sources,
            retrieve_n=self.config.retrieve_n,
            cold_start_source=named.cold_start_source,
            rank=True,
            task_weights=dict(self.config.task_weights),
            k=self.config.retrieve_n * len(named.sources),
        )
        self.retriever_funnel = Funnel(replace(self.funnel_config, rank=False), self.sources)

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.ranker.state_dict()

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.ranker.load_state_dict(state)

    def to(self, device: torch.device) -> RankingFederatedModel:
        self.ranker.to(device)
        if device != self.device:
            self.device = device
            self._sources()
        return self

    def attributes(self, split: SequenceSplit) -> np.ndarray:
        """Each user's attribute indices, from the split's own user features."""
        names = [a for a in USER_ATTRIBUTES if a in split.user_features]
        return self.tables.attributes(
            [{a: str(split.user_features[a][u]) for a in names} for u in range(split.num_users)]
        )

    def scorer(self, split: SequenceSplit, device: torch.device) -> Scorer:
        """The funnel's fused score for each user's candidates, -∞ for every other item: full
        ranking then ranks the union by the ranker, and an item outside it is a miss."""
        self.to(device)
        attributes = self.attributes(split)
        funnel = Funnel(
            self.funnel_config,
            self.sources,
            ranker_scorer(self.ranker, self.tables, sequential_user_vectors(self.encoder)),
            self.config.tasks,
        )
        views: dict[Stage, SequenceSplit] = {}

        def score(users: np.ndarray, stage: Stage) -> torch.Tensor:
            if stage not in views:
                views[stage] = split.visible(stage)
            visible = views[stage]
            result = funnel(visible, users, attributes[users])
            out = torch.full((len(users), split.num_items), -math.inf, dtype=torch.float64)
            rows, cols = np.nonzero(result.items >= 0)
            out[torch.from_numpy(rows), torch.from_numpy(result.items[rows, cols])] = (
                torch.from_numpy(result.scores[rows, cols].astype(np.float64))
            )
            return out

        return score

    def train_local(
        self,
        split: SequenceSplit,
        fed: FederatedConfig,
        seed: int,
        personal: PersonalParameters | None,
        noise_seed: int | None = None,
    ) -> LocalResult:
        """Local epochs on the client's own labelled candidates; ``seed`` drives the shuffling
        (no DP mechanism reads it: record-level DP is refused for the ranker at config load)."""
        labelled = ranker_examples(
            self.retriever_funnel,
            self.tables,
            sequential_user_vectors(self.encoder),
            split,
            self.attributes(split),
            range(3, 3 + self.config.positions),  # before the validation item (2 from the end)
            self.config.tasks,
        )
        if labelled is None:
            return LocalResult(0, math.nan, None)
        examples, labels, _ = labelled
        losses = train_ranker(
            self.ranker,
            examples,
            labels,
            fed.local_epochs,
            fed.local_learning_rate,
            fed.local_batch_size,
            torch.Generator().manual_seed(seed),
            LOCAL_OPTIMIZERS[fed.local_optimizer],
            progress=False,
        )
        self.ranker.eval()
        return LocalResult(len(labels), float(np.mean(losses)), None)

    def record_count(self, split: SequenceSplit, fed: FederatedConfig) -> int:
        raise ValueError(
            "record-level DP is not available for the ranker (an example reads the whole "
            "history before it): use user-level DP (federated.central_dp)"
        )

    def export(self, folder: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in self.ranker.state_dict().items()},
            folder / "ranker.safetensors",
        )


def ranking_model(config: RankingConfig, catalogue: ItemCatalogue) -> RankingFederatedModel:
    """The ranker over the bundle at ``config.retrieval`` (loaded and verified)."""
    folder = Path(config.retrieval)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ranking.retrieval {folder}: no such serving bundle folder on this node; every "
            "node needs it (copy the bundle there, or set ranking.retrieval)"
        )
    return RankingFederatedModel(config, catalogue, load_serving_bundle(folder))


def publish_ranked_round(
    root: Path,
    model: RankingFederatedModel,
    version: int,
    state: Mapping[str, torch.Tensor],
    config: ServingConfig,
    privacy: Mapping[str, float],
) -> Path:
    """The round's serving bundle of a ranker federation: the frozen retrieval bundle's parts
    (its model bundle renumbered to ``version``) and the round's global ranker ``state``."""
    if config.funnel.sources != model.funnel_config.sources:
        # The ranker reads each candidate's source by its index in this order.
        raise ValueError(
            f"serving.funnel.sources {list(config.funnel.sources)}: a ranker federation serves "
            f"its retrieval bundle's sources in their order, {list(model.funnel_config.sources)}"
        )
    ranker = copy.deepcopy(model.ranker).cpu()
    ranker.load_state_dict(state)
    return publish_over_retrieval(
        root, model.retrieval, version, config, privacy, ranker.eval(), model.tables.vocabularies
    )
