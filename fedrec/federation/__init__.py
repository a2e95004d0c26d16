"""The federation core: one client round and what the server records of every round, with no
Flower app in it (only Flower's clipping helper). ``clients.app`` and ``server.app`` are Flower's drivers over it; the in-process
loop (``simulations.inprocess``) drives the same apps without Flower's runtime."""

import logging

from fedrec.federation.config import CentralDPConfig, FederatedConfig, SecureAggregationConfig
from fedrec.federation.model import (
    FederatedModel,
    LocalResult,
    SequentialFederatedModel,
    local_train,
)
from fedrec.federation.privacy import (
    central_event,
    client_seed,
    epsilon_text,
    epsilons_so_far,
    exposure_event,
    noise_seed,
    planned_record_event,
    privacy_disclosures,
)
from fedrec.federation.records import dp_records, event_windows, record_shape

# Opacus calls logging.basicConfig at import, so every Flower line (Flower has its own console
# handler) would print twice through the root logger.
logging.getLogger("flwr").propagate = False

__all__ = [
    "CentralDPConfig",
    "FederatedConfig",
    "FederatedModel",
    "LocalResult",
    "SecureAggregationConfig",
    "SequentialFederatedModel",
    "central_event",
    "client_seed",
    "dp_records",
    "epsilon_text",
    "epsilons_so_far",
    "event_windows",
    "exposure_event",
    "local_train",
    "noise_seed",
    "planned_record_event",
    "privacy_disclosures",
    "record_shape",
]
