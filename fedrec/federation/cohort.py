"""Cohort nodes: one simulation node hosts a shard of virtual users and runs the same client
round for each (``federated.users_per_node``); Flower then carries one message per node, not
one per user, while every user still trains, clips, keeps its ledger and replies as its own.

Node ``k`` of ``ceil(clients / users_per_node)`` hosts clients ``k·U … min((k+1)·U, clients) - 1``.
A message to a cohort node names the clients it is for (``COHORT_CLIENTS``); its reply holds
each client's records under ``<name>:<client>`` (``reply_key``), or ``error:<client>``. Under
user-level DP the server asks for the node's sum (``COHORT_SUM``): a node that trains its
clients as one batched FedSGD pass then replies with each client's metrics, the sum of their
clipped updates (``NODE_SUM``, ``fedrec.federation.updates``) and how many it holds
(``NODE_SUM_FACTS``), in place of one model-sized record per client.
"""

from __future__ import annotations

import math

COHORT_CLIENTS = "cohort-clients"
ROSTER_QUERY = "cohort"  # the query a cohort node answers with the clients it hosts
HOSTED = "hosted-clients"
COHORT_SUM = "cohort-sum"  # the server asks for the node's sum of clipped updates
NODE_SUM, NODE_SUM_FACTS = "node-sum", "node-sum-facts"  # its records (arrays; "count")


def node_count(clients: int, users_per_node: int) -> int:
    return math.ceil(clients / users_per_node)


def hosted_clients(node: int, users_per_node: int, clients: int) -> range:
    """The clients simulation node ``node`` hosts."""
    if not 0 <= node < node_count(clients, users_per_node):
        raise ValueError(f"node {node} is outside the {node_count(clients, users_per_node)} nodes")
    return range(node * users_per_node, min((node + 1) * users_per_node, clients))


def reply_key(name: str, client: int) -> str:
    return f"{name}:{client}"


def split_key(key: str) -> tuple[str, int | None]:
    """(record name, client) of a reply key; client None for the node's own records."""
    name, colon, client = key.rpartition(":")
    return (name, int(client)) if colon else (key, None)
