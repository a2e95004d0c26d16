"""SecAgg+ on the device: Flower's ``secaggplus_mod`` around fedrec's client round.

Flower 1.42's mod speaks the legacy message format (``FitIns``/``FitRes`` records) and masks
whatever parameters the round returns. This mod bridges it (``server.secagg`` is the server's
half). A plain round passes through, unless the config asks for secure aggregation: then a
plain train message is refused rather than answered in the clear. At setup the protocol the
server announces is checked against the config (clipping and quantisation range, modulus,
weight, a threshold above half). At the masking stage it hands fedrec's train handler the
global model, and gives Flower's mod the update (new − global, clipped to C by the round)
plus, under distributed noise, this client's share of the DP noise, drawn from private
randomness (``fedrec.federation.secure``). Every client's weight is 1. (Whether a client takes
part at all it says before the protocol starts: ``clients.app``'s participation query.)

``secagg-drop-out`` in the run config (or ``$FEDREC_SECAGG_DROP_OUT``: Flower's simulation
gives the apps an empty run config), a fraction, makes that share of all clients (the node
config's ``num-partitions``), chosen anew each round, fail at the masking stage, after the keys
were shared: how the dropout measurements of BENCHMARKS.md are made, in every engine. Never
set it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedrec.config import ExperimentConfig
from fedrec.federation.config import FederatedConfig
from fedrec.federation.privacy import noise_seed
from fedrec.federation.secure import (
    ARRAY_KEYS,
    MODULUS_RANGE,
    clipping_range,
    noise_share_std,
    quantization_range,
)
from fedrec.privacy.randomness import numpy_generator

DROP_OUT = "secagg-drop-out"
DROP_OUT_ENV = "FEDREC_SECAGG_DROP_OUT"


def secure_aggregation_mod(
    experiment: Callable[[Context], ExperimentConfig], client_id: Callable[[Context], int]
) -> Mod:
    """The mod for the train handler; ``experiment`` reads the run's config on this node and
    ``client_id`` the client it runs. A
    federation configured with ``secure_aggregation`` never gets an update in the clear, and
    the protocol's settings the server announces are checked against the config."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = experiment(context)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            if config.federated.secure_aggregation is not None:
                raise PermissionError(
                    "this federation aggregates securely (federated.secure_aggregation): a "
                    "plain train message would send this client's update in the clear"
                )
            return call_next(msg, context)  # a plain round
        if configs.get(Key.STAGE) == Stage.SETUP:
            _check_setup(configs, config.federated)

        def masked_round(inner: Message, ctx: Context) -> Message:
            return _masked_round(inner, ctx, call_next, config, client_id(ctx))

        return secaggplus_mod(msg, context, masked_round)

    return mod


def _check_setup(configs: ConfigRecord, fed: FederatedConfig) -> None:
    """Refuse a round whose announced protocol is not the one the config implies: another
    clipping or quantisation range, weights, or a threshold that lets the server rebuild both
    secrets of a client."""
    if fed.secure_aggregation is None:
        raise PermissionError("a SecAgg+ round in a federation without secure_aggregation")
    cohort = int(cast(int, configs[Key.SAMPLE_NUMBER]))
    shares, threshold = (
        int(cast(int, configs[Key.SHARE_NUMBER])),
        int(cast(int, configs[Key.THRESHOLD])),
    )
    expected = {
        Key.CLIPPING_RANGE: clipping_range(fed),
        Key.TARGET_RANGE: quantization_range(cohort),
        Key.MOD_RANGE: MODULUS_RANGE,
        Key.MAX_WEIGHT: 1.0,
    }
    for key, value in expected.items():
        if not math.isclose(float(cast(float, configs[key])), value, rel_tol=1e-9):
            raise ValueError(f"SecAgg+ setup: {key} {configs[key]!r} is not {value!r}")
    if 2 * threshold <= min(shares, cohort):
        raise ValueError(f"SecAgg+ setup: threshold {threshold} is not more than half of {shares}")


def _masked_round(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    config: ExperimentConfig,
    partition: int,
) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    round_number = int(cast(int, fitins.config["server-round"]))
    if _drops_out(context, round_number, partition):
        raise ConnectionAbortedError(f"{DROP_OUT}: client {partition} left round {round_number}")
    keys = json.loads(str(fitins.config[ARRAY_KEYS]))
    current = parameters_to_ndarrays(fitins.parameters)
    settings = {k: v for k, v in fitins.config.items() if k != ARRAY_KEYS}
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in zip(keys, current, strict=True)}),
            "config": ConfigRecord(settings),  # type: ignore[arg-type]
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = reply.content.array_records["arrays"].to_numpy_ndarrays()
    update = [t.astype(np.float64) - c for t, c in zip(trained, current, strict=True)]
    std = noise_share_std(config.federated)
    if std > 0:
        rng = numpy_generator(
            noise_seed(config.federated, config.seed, round_number, partition, stream=3)
        )
        update = [u + rng.normal(0.0, std, u.shape) for u in update]
    metrics = dict(reply.content.metric_records["metrics"])
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(update),
        num_examples=1,  # every client counts once in DP-FedAvg's sum
        metrics=metrics,  # type: ignore[arg-type]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _drops_out(context: Context, round_number: int, partition: int) -> bool:
    """Whether this client is one of the ⌈rate × clients⌉ of the round the drop-out setting
    fails (the same choice on every node: each ranks every client's draw for the round)."""
    rate = float(cast(float, context.run_config.get(DROP_OUT, os.environ.get(DROP_OUT_ENV, 0))))
    clients = int(cast(int, context.node_config.get("num-partitions", 0)))
    if rate <= 0 or clients <= partition:
        return False
    # Which clients fail is a test fixture, not a secret: seeded, so every engine drops the same.
    draws = [random.Random(f"{round_number}:{p}").random() for p in range(clients)]
    return draws[partition] <= sorted(draws)[math.ceil(rate * clients) - 1]
