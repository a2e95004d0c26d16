"""The simulated population of a federated run: the whole data set, its partition into
clients, and what the server publishes from it.

Only the simulation side and the server (which evaluates the global model on every user's
held-out items in research mode) hold a population. A client never does: it reads its own
store and the published catalogue (``clients.app``); ``write_stores`` is how a simulation gives
each simulated device its own events, and nothing else.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.audits import AuditContext
from fedrec.config import ExperimentConfig, load_config
from fedrec.data import prepare_split
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.dataset import InteractionDataset
from fedrec.data.membership import held_out, plant_canaries
from fedrec.data.partition import partition_users
from fedrec.data.split import SequenceSplit
from fedrec.data.store import EventStore, partition_events
from fedrec.federation.layout import CATALOGUE_FILE, STORE_DIR, simulated_store
from fedrec.llm_rec.federated import ensure_foundation
from fedrec.semantic_id.rqvae import SemanticIds


@dataclass
class Population:
    """Everything a process of a simulated federation derives from the config alone."""

    config: ExperimentConfig
    dataset: InteractionDataset
    split: SequenceSplit
    partitions: list[np.ndarray]

    @functools.cached_property
    def audit_context(self) -> AuditContext:
        """Group labels, item popularity and genres of the whole population (the server's
        audit; each simulated device's store carries its own users' labels)."""
        return AuditContext.build(self.dataset, self.split, self.config.audit)

    def publish(self, run_dir: Path, progress: bool = False) -> ItemCatalogue:
        """The server's start of a run: the foundation stage when the model needs one, then the
        item catalogue (ids, content, semantic-ID codes when the run has them, popularity for
        the federated audit) written to ``run_dir/catalogue.json`` for the clients."""
        codes = None
        llm = self.config.llm
        if llm is not None:
            folder = ensure_foundation(
                llm,
                self.config.semantic_id,
                self.config.seed,
                self.dataset,
                self.split,
                run_dir,
                progress,
            )
            codes = SemanticIds.load(folder / "semantic_ids").codes
        # Item popularity is a count over every user's training data: published only when the
        # clients need it (the federated audit), and then disclosed in the privacy report.
        audit = self.config.audit
        popularity = (
            self.split.train_item_counts() if audit.enabled and audit.mode == "federated" else None
        )
        catalogue = ItemCatalogue.from_dataset(self.dataset, popularity=popularity, codes=codes)
        catalogue.save(run_dir / CATALOGUE_FILE)
        return catalogue

    def write_stores(self, run_dir: Path) -> None:
        """Each simulated device's store: its users' events (raw ids) and their audit groups."""
        shutil.rmtree(run_dir / STORE_DIR, ignore_errors=True)
        for partition in range(len(self.partitions)):
            self.write_store(simulated_store(run_dir, partition), partition)

    def write_store(self, folder: Path, partition: int) -> None:
        """Client ``partition``'s events into the store at ``folder`` (a device's own data)."""
        users = self.partitions[partition]
        groups = self.audit_context.groups
        attributes = {
            str(self.dataset.raw_user_ids[u]): {a: str(labels[u]) for a, labels in groups.items()}
            for u in users
        }
        EventStore.write(folder, partition_events(self.dataset, self.split, users), attributes)


def population_of(config: ExperimentConfig) -> Population:
    """The data and partition of a federated run's config; users held out for the privacy
    audit have no client, and canaries are planted (``fedrec.data.membership``)."""
    dataset, split = prepare_split(config.data)
    fed, audit = config.federated, config.privacy_audit
    partitions = partition_users(
        dataset, fed.partitioning, fed.num_partitions, fed.partition_attribute
    )
    if audit.enabled:
        split = plant_canaries(split, audit, config.seed)
        outside = held_out(split.num_users, audit, config.seed)
        partitions = [p[~outside[p]] for p in partitions if (~outside[p]).any()]
    return Population(config, dataset, split, partitions)


def load_population(config_path: str) -> Population:
    """Load (once per process) the data and partition of a federated run."""
    # By absolute path: `fedrec simulate` loads it by the path given, its ServerApp (in the same
    # process) by $FEDREC_CONFIG; two keys for one file built a 10^6-user population twice.
    return _population_at(str(Path(config_path).resolve()))


@functools.lru_cache(maxsize=2)
def _population_at(config_path: str) -> Population:
    return population_of(load_config(config_path))
