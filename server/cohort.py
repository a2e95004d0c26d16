"""The server's side of cohort nodes (``fedrec.federation.cohort``): a grid whose "nodes" are
the clients the real nodes host, one virtual node ID each.

Each node says which clients it hosts once, answering a roster query that also brings it the
run's published catalogue and config (``publish``): the server's ``IdentifiedGrid`` takes a
virtual node's client from that roster instead of asking every client, which at 10^6 clients
meant 10^6 query and reply messages in the driver (gigabytes) for what 20 nodes can say.

The strategies, the reply validation, user-level DP and the ledger see one node per client and
one reply per client, exactly as without cohorts; only the transport changes. The messages of a
round to the clients of one node travel as one message naming them, and its reply is split
back into one reply per client, so a federation of cohort nodes computes what one node per
client computes (tested), with one Flower message per node instead of one per client.

With ``node_sums`` (user-level DP) the grid asks each node for the sum of its clients' clipped
updates: a node that sends one gives each client's reply its metrics only, and its first
client's reply carries the node's sum (``NODE_SUM``), which ``server.dp`` adds as the sum of
that many clipped updates. Only the simulator's own cohort nodes send sums: a deployment's
devices are one node each and reply with their own update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode

from fedrec.federation.cohort import (
    COHORT_CLIENTS,
    COHORT_SUM,
    HOSTED,
    ROSTER_QUERY,
    node_count,
    split_key,
)

log = logging.getLogger("fedrec.server")


class CohortGrid:
    """Virtual node IDs 1, 2, … for the clients the real nodes of ``grid`` host (each node says
    which, once, answering a roster query); ``send_and_receive`` groups by real node."""

    def __init__(  # type: ignore[no-untyped-def]
        self, grid, users_per_node: int, clients: int, timeout: float, node_sums: bool = False
    ):
        self.grid = grid
        self.users_per_node, self.clients, self.timeout = users_per_node, clients, timeout
        self.node_sums = node_sums
        self.virtual: dict[int, tuple[int, int]] = {}  # virtual node ID -> (node, client)
        self.rostered: set[int] = set()
        self.published = ConfigRecord()  # what every node is sent with the roster query

    def publish(self, published: ConfigRecord) -> None:
        """Send ``published`` (the identify query's catalogue and config) to every node with
        its roster query."""
        self.published = published

    def client_of(self, virtual_node: int) -> int | None:
        """The client a virtual node is, as its real node's roster said."""
        hosted = self.virtual.get(virtual_node)
        return None if hosted is None else hosted[1]

    def get_node_ids(self) -> list[int]:
        online = list(self.grid.get_node_ids())
        new = [n for n in online if n not in self.rostered]
        if new:
            self._roster(new)
        connected = set(online)
        return [v for v, (node, _) in self.virtual.items() if node in connected]

    def _roster(self, nodes: list[int]) -> None:
        asked = ConfigRecord({"users-per-node": self.users_per_node, "clients": self.clients})
        queries = [
            Message(
                RecordDict({"config": asked, "published": self.published}),
                dst_node_id=n,
                message_type=f"{MessageType.QUERY}.{ROSTER_QUERY}",
            )
            for n in nodes
        ]
        for reply in self.grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            self.rostered.add(node)
            hosted = None if reply.has_error() else reply.content.config_records["config"][HOSTED]
            if not isinstance(hosted, list):
                log.warning("node %d did not say which clients it hosts: not used", node)
                continue
            for client in hosted:
                self.virtual[len(self.virtual) + 1] = (node, int(client))
        hosted_now = len(self.virtual)
        if hosted_now < self.clients:
            log.warning(
                "the nodes so far host %d of the %d clients: the others cannot be sampled "
                "until their nodes connect (a simulation needs ceil(clients / users_per_node) "
                "= %d nodes)",
                hosted_now,
                self.clients,
                node_count(self.clients, self.users_per_node),
            )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """One message per real node, naming its clients; the reply split into one per client
        (a client's error stays that client's; a node's error is all of its clients'; a node
        that does not answer answers for none of them)."""
        groups: dict[int, list[Message]] = {}
        for message in messages:
            node, _ = self.virtual[message.metadata.dst_node_id]
            groups.setdefault(node, []).append(message)
        outgoing = []
        for node, group in groups.items():
            first = group[0]
            if any(m.content is not first.content for m in group):
                raise RuntimeError(
                    "cohort nodes carry one payload per node and round; this strategy sent "
                    "clients of one node different ones: set federated.users_per_node: 1"
                )
            config = ConfigRecord(dict(first.content.config_records.get("config", ConfigRecord())))
            config[COHORT_CLIENTS] = [self._client(m) for m in group]
            if self.node_sums and first.metadata.message_type == MessageType.TRAIN:
                config[COHORT_SUM] = True
            content = RecordDict(
                {**{k: v for k, v in first.content.items() if k != "config"}, "config": config}
            )
            outgoing.append(
                Message(content, dst_node_id=node, message_type=first.metadata.message_type)
            )
        replies = {
            r.metadata.src_node_id: r for r in self.grid.send_and_receive(outgoing, timeout=timeout)
        }
        split: list[Message] = []
        for node, group in groups.items():
            if node not in replies:
                continue
            by_client = _by_client(replies[node])
            split.extend(self._split(replies[node], by_client, m) for m in group)
        return split

    def _client(self, message: Message) -> int:
        return self.virtual[message.metadata.dst_node_id][1]

    def _split(self, reply: Message, by_client: dict[int, RecordDict], message: Message) -> Message:
        if reply.has_error():
            return Message(reply.error, reply_to=message)
        content = by_client.get(self._client(message), RecordDict())
        error = content.get("error")
        if error is not None:
            reason = str(cast(ConfigRecord, error).get("reason", "the client raised"))
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        return Message(content, reply_to=message)


def _by_client(reply: Message) -> dict[int, RecordDict]:
    """A node's reply as one ``RecordDict`` per client (one pass over its records); the node's
    own records (its sum) go with its first client that did not fail."""
    if reply.has_error():
        return {}
    split: dict[int, RecordDict] = {}
    own = RecordDict()
    for key, record in reply.content.items():
        name, client = split_key(key)
        if client is None:
            own[name] = record
        else:
            split.setdefault(client, RecordDict())[name] = record
    carrier = next((c for c in split.values() if "error" not in c), None)
    if own and carrier is None:
        log.warning("a node sent its sum with no client's reply: dropped")
    elif own and carrier is not None:
        for name, record in own.items():
            carrier[name] = record
    return split
