"""The federation's round loop, over any grid: Flower's (the ServerApp, in a simulation or a
deployment) or the in-process one (``simulations.inprocess``). Both engines run this loop, the
same strategy stack and the same ClientApp, so they differ only in how messages travel.

Written here rather than using Flower's ``Strategy.start`` because the server must decide
between rounds (stop before a round that would pass the ε budget, stop on an audit breach or
when every client failed) without raising through Flower's loop, and must know which client
each node is (``IdentifiedGrid``) to sample by client, not by Flower's random node IDs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from tqdm import tqdm

from fedrec.federation.config import FederatedConfig
from fedrec.federation.layout import CATALOGUE_FILE
from fedrec.federation.privacy import dp_statement_problem
from fedrec.llm_rec.federated import foundation_folder
from fedrec.population import Population
from fedrec.serving.bundle import ModelBundle, foundation_digest
from fedrec.serving.federated import RankingFederatedModel, publish_ranked_round
from fedrec.serving.store import (
    SERVING_DIR,
    load_serving_bundle,
    publish_over_retrieval,
    publish_round,
)
from server.cohort import CohortGrid
from server.dp import UserLevelDP
from server.federation import Federation
from server.sampling import CohortSampler
from server.secagg import SecureAggregation
from server.strategy import LedgerKeeper, build_strategy
from server.validation import ReplyValidator

log = logging.getLogger("fedrec.server")
PARTITION_KEY = "partition-id"
IDENTIFY_TRIES = 3


class MessageGrid(Protocol):
    """What the loop needs of a ``flwr.serverapp.Grid``."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]: ...


class IdentifiedGrid:
    """A grid whose nodes are listed in the order of the clients they run (their
    ``partition-id``, asked once per node with a query message), so the strategies' cohort is
    a choice of clients, the same in every engine. The query carries the run's item catalogue
    (its JSON and hash) and experiment config, which a node without them keeps.

    With an ``enrolment`` (a deployment with SuperNode auth, ``server.enrolment``) a node's
    client is the one its authenticated key was enrolled as, sent in the query; a node not
    enrolled is never asked, and one that answers another client is excluded. Without one, the
    node says which client it runs. Either way a client id outside ``0..clients-1``, a malformed
    reply or a client another node already runs excludes the node (with a warning, once);
    ``partition_of`` is then the only source of a reply's client (the server round books
    releases by it). Over a ``CohortGrid`` the nodes' rosters already say which client each
    virtual node is, and bring them the catalogue and config: no client is asked again."""

    def __init__(
        self,
        grid: MessageGrid,
        timeout: float,
        clients: int,
        catalogue: str = "",
        config: str = "",
        enrolment: Mapping[int, int] | None = None,
    ):
        self.grid = grid
        self.timeout = timeout
        self.clients = clients
        self.catalogue = catalogue
        self.catalogue_hash = json.loads(catalogue)["content_hash"] if catalogue else ""
        self.config = config
        self.enrolment = enrolment
        self.partition_of: dict[int, int] = {}
        self.excluded: set[int] = set()
        self.failed: dict[int, int] = {}  # error replies by node: asked again, up to 3
        if isinstance(grid, CohortGrid):
            grid.publish(self._published(None))

    def get_node_ids(self) -> list[int]:
        connected = list(self.grid.get_node_ids())
        new = [n for n in connected if n not in self.partition_of and n not in self.excluded]
        if new:
            self._identify(new)
            if not self.partition_of and len(self.excluded) >= self.clients:
                raise RuntimeError(
                    f"none of {len(self.excluded)} nodes could say which client it runs (see the "
                    "warnings and the clients' errors above): the federation cannot sample"
                )
        known = [n for n in connected if n in self.partition_of]
        return sorted(known, key=self.partition_of.__getitem__)

    def _identify(self, nodes: list[int]) -> None:
        if self.enrolment is not None:
            strangers = [n for n in nodes if n not in self.enrolment]
            for node in strangers:
                log.warning(
                    "node %d excluded: its key is not enrolled (fedrec server register)", node
                )
            self.excluded.update(strangers)
            nodes = [n for n in nodes if n not in strangers]
        taken = set(self.partition_of.values())
        for node, partition in self._claims(nodes):
            enrolled = None if self.enrolment is None else self.enrolment.get(node)
            why = ""
            if partition is None or not 0 <= partition < self.clients:
                why = "no valid client id"
            elif enrolled is not None and partition != enrolled:
                why = f"client {partition}, but its key is enrolled as client {enrolled}"
            elif partition in taken:
                why = "a client another node runs"
            if why or partition is None:
                log.warning("node %d excluded from sampling: it answered %s", node, why)
                self.excluded.add(node)
                continue
            self.partition_of[node] = partition
            taken.add(partition)

    def _claims(self, nodes: list[int]) -> Iterator[tuple[int, int | None]]:
        """(node, the client it says it runs, None for a malformed or failed reply) of each node
        that answered for good; one whose error may pass is left to ask again later."""
        if isinstance(self.grid, CohortGrid):
            yield from ((n, self.grid.client_of(n)) for n in nodes)
            return
        shared = RecordDict({"config": self._published(None)})  # one payload without enrolment
        queries = [
            Message(
                shared if self.enrolment is None else RecordDict({"config": self._published(n)}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        for reply in self.grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():  # e.g. a device whose app held its store: asked again later
                self.failed[node] = self.failed.get(node, 0) + 1
                if self.failed[node] < IDENTIFY_TRIES:
                    log.warning("node %d could not identify itself: %s", node, reply.error.reason)
                    continue
            yield node, None if reply.has_error() else _claimed_partition(reply)

    def _published(self, node: int | None) -> ConfigRecord:
        client = -1 if self.enrolment is None or node is None else self.enrolment[node]
        return ConfigRecord(
            {
                "catalogue": self.catalogue,
                "catalogue-hash": self.catalogue_hash,
                "config": self.config,
                "client": client,
            }
        )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


def _claimed_partition(reply: Message) -> int | None:
    metrics = reply.content.metric_records.get("metrics")
    value = None if metrics is None else metrics.get(PARTITION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_federation(
    population: Population,
    run_dir: Path,
    grid: MessageGrid,
    *,
    resume: bool = False,
    engine: str = "flower",
    write_stores: bool = True,
    progress: bool = False,
    enrolment: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``population.config``'s federation over ``grid``: publish the item catalogue (and,
    simulating, each device's store), then the rounds, each publishing its model bundle;
    returns ``results.json``'s content. ``enrolment`` maps authenticated node IDs to clients
    (a deployment with SuperNode auth). A deployment (``write_stores`` false) sends every
    device the final bundle after the last round."""
    started = time.perf_counter()
    config, fed = population.config, population.config.federated
    ranking = config.ranking
    if ranking is not None and "like" in ranking.tasks and population.split.ratings is None:
        raise ValueError(
            f"ranking.tasks: 'like' needs ratings, and {population.dataset.name or 'the data'} "
            "has none: set ranking.tasks: [engage]"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    catalogue = population.publish(run_dir, progress=progress)
    client_audit = config.audit.enabled and config.audit.mode == "federated"
    inner = build_strategy(fed, len(population.partitions), config.seed, client_audit)
    federation = Federation(population, catalogue, run_dir, resume, inner, engine)
    if isinstance(inner, CohortSampler):
        inner.may_train = federation.may_train
    if federation.rounds_done == 0 and not federation.may_start(1):
        raise ValueError(
            f"central_dp.target_epsilon {fed.central_dp and fed.central_dp.target_epsilon} is "
            "below the ε of one round: raise central_dp.noise_multiplier or the budget"
        )
    if write_stores:
        population.write_stores(run_dir)
    # Under user-level DP the server needs only the sum of clipped updates: cohort nodes may
    # send theirs (server.cohort).
    node_sums = fed.users_per_node > 1 and fed.central_dp is not None
    if fed.users_per_node > 1:  # the clients' messages travel one per node (server.cohort)
        grid = CohortGrid(
            grid, fed.users_per_node, federation.num_clients, fed.round_timeout, node_sums
        )
    strategy = ReplyValidator(
        LedgerKeeper(
            inner, federation.on_replies, federation.on_evaluate if client_audit else None
        ),
        weighted=fed.weighted,
        # user-level DP clips every update to C itself (server.dp)
        check_norm=fed.central_dp is None,
        max_update_norm=fed.max_update_norm,
        max_client_weight=fed.max_client_weight,
        statement_problem=functools.partial(dp_statement_problem, fed),
        node_sums=node_sums,
    )
    secure = None
    if fed.secure_aggregation is not None:  # the config demands central_dp with it
        assert isinstance(inner, UserLevelDP)
        secure = SecureAggregation(fed, inner, federation.on_replies, strategy.metrics_problem)
    published = (run_dir / CATALOGUE_FILE).read_text(encoding="utf-8")
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=True)
    beyond = sorted(c for c in (enrolment or {}).values() if not 0 <= c < federation.num_clients)
    if beyond:
        raise ValueError(
            f"enrolled clients {beyond} are outside the config's {federation.num_clients} "
            "clients: raise the number of clients (federated.num_partitions or the data's users)"
        )
    nodes = IdentifiedGrid(
        grid, fed.round_timeout, federation.num_clients, published, config_text, enrolment
    )
    federation.partition_of = nodes.partition_of
    # Strategies read only get_node_ids of the grid they configure: the identified view.
    identified = cast(Grid, nodes)
    sent = ConfigRecord(
        {"local-epochs": fed.local_epochs, "catalogue-hash": catalogue.content_hash}
    )
    arrays = ArrayRecord(federation.model.shared_state())

    # The frozen public folder the federation builds on, named in every bundle: the LLM
    # recommender's foundation, or a ranker federation's retrieval bundle.
    foundation = (
        foundation_digest(foundation_folder(config.llm, run_dir))
        if config.llm is not None
        else foundation_digest(Path(config.ranking.retrieval))
        if config.ranking is not None
        else ""
    )

    def bundle(version: int) -> ModelBundle:
        state = arrays.to_torch_state_dict()
        return ModelBundle(
            version, config_text, published, catalogue.content_hash, state, foundation
        )

    def round_config(version: int) -> ConfigRecord:
        """What a round's messages say besides the arrays: the hash of the bundle they are."""
        hashed: dict[str, int | str] = {
            "bundle-version": version,
            "bundle-hash": bundle(version).content_hash,
        }
        return ConfigRecord({**dict(sent), **hashed})

    # The retrieval an LLM federation's serving bundles carry (loaded and verified once).
    frozen = (
        load_serving_bundle(Path(config.serving.retrieval))
        if config.serving is not None and config.llm is not None
        else None
    )

    def publish(version: int) -> None:
        """The round's model bundle and, with ``serving``, its serving bundle (the ledger's ε
        at that round)."""
        bundle(version).publish(run_dir)
        if config.serving is not None and isinstance(federation.model, RankingFederatedModel):
            publish_ranked_round(
                run_dir / SERVING_DIR,
                federation.model,
                version,
                arrays.to_torch_state_dict(),
                config.serving,
                federation.epsilons(),
            )
        elif config.serving is not None and frozen is not None:  # an LLM federation
            publish_over_retrieval(
                run_dir / SERVING_DIR,
                frozen,
                version,
                config.serving,
                federation.epsilons(),
                llm=bundle(version),
            )
        elif config.serving is not None:
            publish_round(
                run_dir / SERVING_DIR,
                bundle(version),
                config.model_name,
                dataclasses.asdict(config.model),
                config.serving,
                federation.epsilons(),
            )

    stopped, published_version = "", federation.rounds_done
    if federation.rounds_done == 0:
        federation.end_round(0, arrays, 0.0, last=False)
    publish(federation.rounds_done)  # (again on resume: a kill may have lost it)
    for round_number in _rounds(federation.rounds_done + 1, fed.num_rounds, progress):
        if not federation.may_start(round_number):
            stopped = f"round {round_number} would exceed the federation's ε budget"
            break
        round_started = time.perf_counter()
        messages = strategy.configure_train(
            round_number, arrays, round_config(round_number - 1), identified
        )
        if secure is None:
            replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
            aggregated, train_metrics = strategy.aggregate_train(round_number, replies)
        else:
            aggregated, train_metrics = secure.train(cast(Grid, grid), round_number, messages)
        if federation.failure:
            stopped = federation.failure
            break
        if aggregated is not None:  # None: nobody trained (every sampled client refused)
            arrays = aggregated
        last = round_number == fed.num_rounds or not federation.may_start(round_number + 1)
        # The federated audit costs clients ε: only for a round whose model is evaluated.
        if client_audit and (federation.evaluated(round_number) or last):
            evaluations = strategy.configure_evaluate(
                round_number, arrays, round_config(round_number), identified
            )
            strategy.aggregate_evaluate(
                round_number, grid.send_and_receive(evaluations, timeout=fed.round_timeout)
            )
        seconds = time.perf_counter() - round_started  # sampling to aggregation
        reason = federation.end_round(round_number, arrays, seconds, last, train_metrics)
        publish(round_number)
        published_version = round_number
        if reason:
            stopped = reason
            break
    if stopped:
        (log.error if federation.failure else log.warning)("stopping: %s", stopped)
    if not write_stores and not federation.failure:
        _send_final_bundle(grid, nodes, arrays, round_config(published_version), fed)
    return federation.finish(stopped, bool(federation.failure), started)


def _send_final_bundle(
    grid: MessageGrid,
    nodes: IdentifiedGrid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    fed: FederatedConfig,
) -> None:
    """Every identified device gets the run's final model (its bundle hash to check)."""
    queries = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node,
            message_type=f"{MessageType.QUERY}.bundle",
        )
        for node in nodes.get_node_ids()
    ]
    kept = [
        r for r in grid.send_and_receive(queries, timeout=fed.round_timeout) if not r.has_error()
    ]
    log.info("the final model bundle reached %d of %d devices", len(kept), len(queries))


def _rounds(first: int, last: int, progress: bool) -> Iterator[int]:
    return iter(tqdm(range(first, last + 1), desc="rounds", disable=not progress))
