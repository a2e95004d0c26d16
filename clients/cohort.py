"""A cohort node's side (``fedrec.federation.cohort``): the mod that runs a message for every
client it names, each with its own context, and packs the replies into one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedrec.federation.cohort import COHORT_CLIENTS, HOSTED, hosted_clients, reply_key

log = logging.getLogger("fedrec.client")


ShardTrainer = Callable[[Message, Context, list[int]], RecordDict | None]


def cohort_mod(train_shard: ShardTrainer | None = None) -> Mod:
    """A mod under which messages naming ``COHORT_CLIENTS`` run once per client, as that
    client's node would run them (node config ``partition-id`` = the client); others pass
    through. ``train_shard`` may answer a training message for all the clients at once (the
    records the loop would pack), or return None to leave it to the loop."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = msg.content.config_records.get("config")
        if config is None or COHORT_CLIENTS not in config:
            return call_next(msg, context)
        clients = [int(c) for c in cast(list[int], config[COHORT_CLIENTS])]
        if train_shard is not None and msg.metadata.message_type == MessageType.TRAIN:
            packed = train_shard(msg, context, clients)
            if packed is not None:
                return Message(packed, reply_to=msg)
        return _each_client(msg, context, call_next, clients)

    return mod


def _each_client(
    msg: Message, context: Context, call_next: ClientAppCallable, clients: list[int]
) -> Message:
    config = msg.content.config_records["config"]
    own = ConfigRecord({k: v for k, v in config.items() if k != COHORT_CLIENTS})
    packed = RecordDict()
    received = msg.content
    for client in clients:
        # The message itself carries each client's copy in turn (a new Message needs a task
        # identity that Flower's simulation workers do not set).
        msg.content = RecordDict({**{k: v for k, v in received.items() if k != "config"}})
        msg.content["config"] = own
        each = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**context.node_config, "partition-id": client},
            state=RecordDict(),
            run_config=context.run_config,
        )
        try:
            reply = call_next(msg, each)
        except Exception as err:  # as its own node would: an error reply for this client only
            log.exception("client %d raised", client)
            packed[reply_key("error", client)] = ConfigRecord(
                {"reason": f"{type(err).__name__}: {err}"}
            )
            continue
        if reply.has_error():
            packed[reply_key("error", client)] = ConfigRecord({"reason": str(reply.error.reason)})
            continue
        for name, record in reply.content.items():
            packed[reply_key(name, client)] = record
    msg.content = received
    return Message(packed, reply_to=msg)


def roster(msg: Message, context: Context) -> Message:
    """The clients this simulation node hosts (node config ``partition-id``: the node's index)."""
    asked = msg.content.config_records["config"]
    hosted = hosted_clients(
        int(cast(int, context.node_config["partition-id"])),
        int(cast(int, asked["users-per-node"])),
        int(cast(int, asked["clients"])),
    )
    return Message(RecordDict({"config": ConfigRecord({HOSTED: list(hosted)})}), reply_to=msg)
