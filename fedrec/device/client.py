"""The on-device client SDK: one user's device, everything it holds in its encrypted store.

``open(folder, key)`` gives a ``DeviceClient``. The app records the user's events
(``record``), asks for recommendations (``recommend``: on-device, from the latest global model
bundle, no network), and shows ``privacy_statement``; ``export`` and ``forget`` serve the
user's rights. The federation's ClientApp (``clients.app``, on a SuperNode started by
``fedrec device join``) calls ``accept_enrolment``, ``train_round`` and ``evaluate_round``.

What the store holds (all sealed, ``fedrec.device.store``): the events (rows of ``event``, in
raw item ids, with the user's rating when they gave one: an item the catalogue lacks is kept and
reported, and used once a catalogue revision lists it), the user's attributes
(``set_attributes``: what the ranker reads), the privacy ledger and enrolment, the experiment
config and item catalogue the server published, the latest model bundle and the user's personal
parameters (the LLM recommender's personal prompt). The LLM recommender also needs its frozen
foundation, and a federation of the funnel's ranker its frozen retrieval bundle: public and
large, the device holds it as a folder (``foundation``) fetched apart from the rounds; the
bundle names its digest and the device uses no other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedrec.config import ExperimentConfig, parse_config
from fedrec.data.batching import next_item_batch
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit
from fedrec.data.store import MIN_EVENTS, RawEvents, client_split
from fedrec.device.store import EncryptedStore
from fedrec.errors import FedrecDataError
from fedrec.federated_models import build_federated_model
from fedrec.federation.client import (
    ClientReply,
    declined_reply,
    evaluate_round,
    over_budget,
    planned_release,
    train_round,
)
from fedrec.federation.model import FederatedModel, SequentialFederatedModel
from fedrec.federation.privacy import client_party
from fedrec.llm_rec.federated import LLMFederatedModel, new_llm_model
from fedrec.llm_rec.model import LLMRecommender
from fedrec.privacy import PrivacyLedger
from fedrec.serving.bundle import ModelBundle, bundle_hash, foundation_digest
from fedrec.serving.federated import ranking_model
from fedrec.serving.store import MANIFEST

log = logging.getLogger("fedrec.device")

EVENT, LEDGER, ENROLMENT, UNPROTECTED = "event", "ledger", "enrolment", "unprotected-rounds"
CONFIG, CATALOGUE, BUNDLE, PERSONAL = "config", "catalogue", "bundle", "personal"
ATTRIBUTES = "attributes"
USER = "device-user"  # a device holds one user; the split's users are named by this
# (item id, timestamp, kind) or (item id, timestamp, kind, rating or None)
Event = tuple[str, int, str] | tuple[str, int, str, float | None]


@dataclass(frozen=True)
class Recommendation:
    item: str  # raw item id, as the catalogue publishes it
    title: str
    score: float


@dataclass(frozen=True)
class ParticipationPolicy:
    """When this device takes part in a training round. Besides the federation's
    ``record_epsilon_budget``: at least ``min_events`` known events, at most ``epsilon_budget``
    of the user's own (None: the federation's only), ``condition`` true when asked (the app's
    rule: charging, idle, on Wi-Fi), and record-level DP in the federation's config unless
    ``allow_without_dp`` (an update without it has no ε bound against the server)."""

    min_events: int = MIN_EVENTS
    epsilon_budget: float | None = None
    condition: Callable[[], bool] | None = None
    allow_without_dp: bool = False

    def __post_init__(self) -> None:
        if self.min_events < MIN_EVENTS:
            raise ValueError(f"min_events must be >= {MIN_EVENTS} (leave-one-out needs them)")
        if self.epsilon_budget is not None and self.epsilon_budget <= 0:
            raise ValueError("epsilon_budget must be > 0")


@dataclass
class _Cache:
    """What ``recommend`` reuses between calls; dropped when its source changes."""

    events: RawEvents | None = None
    model: tuple[str, Any] | None = None  # (bundle hash, model)
    catalogue: tuple[str, ItemCatalogue] | None = None
    foundation: tuple[str, str] | None = None  # (folder and version, digest)
    seen: dict[str, np.ndarray] = field(default_factory=dict)


def open(  # the SDK's entry point: ``fedrec.device.open``
    folder: Path | str,
    key: bytes,
    policy: ParticipationPolicy | None = None,
    wait: float = 0.0,
    foundation: Path | None = None,
) -> DeviceClient:
    """The device client of the store in ``folder`` (made if absent), sealed with ``key``
    (32 bytes: from an OS keystore, or ``fedrec.device.store.key_from_passphrase``);
    ``foundation``: the LLM recommender's foundation folder, for a federation of it."""
    store = EncryptedStore(Path(folder), key, wait)
    return DeviceClient(store, policy or ParticipationPolicy(), foundation)


class StoredPersonal:
    """``PersonalParameters`` sealed in the device's store (safetensors bytes)."""

    def __init__(self, store: EncryptedStore):
        self.store = store

    def load(self) -> dict[str, torch.Tensor] | None:
        data = self.store.get(PERSONAL)
        return None if data is None else dict(load_tensors(data))

    def save(self, state: dict[str, torch.Tensor]) -> None:
        self.store.put(PERSONAL, save_tensors({k: v.contiguous() for k, v in state.items()}))


class DeviceClient:
    def __init__(
        self, store: EncryptedStore, policy: ParticipationPolicy, foundation: Path | None = None
    ):
        self.store = store
        self.policy = policy
        self.foundation = foundation
        self.personal = StoredPersonal(store)
        self._cache = _Cache()

    # --- the user's events --------------------------------------------------------------
    def record(
        self, item_id: str, timestamp: int, kind: str = "view", rating: float | None = None
    ) -> bool:
        """Keep one event (``rating``: the user's rating of the item, if they gave one: the
        ranker's *like* label); returns whether the catalogue knows the item (an unknown one
        is kept, reported by ``unknown_items``, and used once a catalogue lists it)."""
        return self.record_many([(item_id, timestamp, kind, rating)])[0]

    def record_many(self, events: list[Event]) -> list[bool]:
        """Keep several events, (item, timestamp, kind[, rating]), in one transaction (all
        or none)."""
        rows = []
        for item, timestamp, kind, *rated in events:
            if not isinstance(timestamp, int | np.integer) or isinstance(timestamp, bool):
                raise TypeError(f"timestamp must be whole seconds, got {timestamp!r}")
            row: dict[str, Any] = {"item": str(item), "t": int(timestamp), "kind": str(kind)}
            rating = rated[0] if rated else None
            if rating is not None:
                if not isinstance(rating, int | float | np.number) or not np.isfinite(rating):
                    raise TypeError(f"rating must be a finite number or None, got {rating!r}")
                row["rating"] = float(rating)
            rows.append(json.dumps(row).encode())
        self.store.add(EVENT, rows)
        self._cache.events = None
        index = self._catalogue_index()
        known = [index is not None and str(event[0]) in index for event in events]
        unknown = len(known) - sum(known)
        if index is not None and unknown:  # (no item ids in a log: they are the user's)
            log.warning("%d event(s) of items not in the catalogue: kept, not yet used", unknown)
        return known

    def events(self) -> RawEvents:
        if self._cache.events is None:
            rows = [json.loads(r) for r in self.store.rows(EVENT)]
            rated = any("rating" in r for r in rows)
            self._cache.events = RawEvents(
                np.array([USER] * len(rows), dtype=object),
                np.array([r["item"] for r in rows], dtype=object),
                np.array([r["t"] for r in rows], dtype=np.int64),
                np.array([r.get("rating", np.nan) for r in rows]) if rated else None,
            )
        return self._cache.events

    def set_attributes(self, attributes: Mapping[str, str]) -> None:
        """The user's own attributes (age, gender, occupation), which the ranker reads on this
        device; they never leave it, and ``forget`` deletes them."""
        values = {str(k): str(v) for k, v in attributes.items()}
        self.store.put(ATTRIBUTES, json.dumps(values).encode())

    def attributes(self) -> dict[str, str]:
        held = self.store.get(ATTRIBUTES)
        return {} if held is None else dict(json.loads(held))

    def _split(self, catalogue: ItemCatalogue) -> SequenceSplit:
        """The user's known events as a split, with their ratings and attributes."""
        return client_split(self.events(), catalogue, {USER: self.attributes()}).split

    def unknown_items(self) -> dict[str, int]:
        """Items recorded that the held catalogue does not list, with their event counts (all
        of them before the device has a catalogue)."""
        index = self._catalogue_index() or {}
        return dict(Counter(i for i in self.events().items.tolist() if i not in index))

    # --- what the server published ------------------------------------------------------
    def accept_enrolment(self, client: int, config: str, catalogue: str) -> None:
        """The server's first message: which client this device is (from its authenticated
        key), the experiment config and the item catalogue (verified before it is kept)."""
        if client < 0:
            raise ValueError(
                f"client {client}: the server enrols no keys (run it with `fedrec server run`, "
                "whose enrolment names each device) and this device names no client"
            )
        enrolled = self.enrolment()
        if enrolled is not None and enrolled != client:
            raise PermissionError(
                f"this store is enrolled as client {enrolled}, the server says {client}: a store "
                "moved to another device key; enrol it again or use its own key"
            )
        parse_config(yaml.safe_load(config) or {}, "the server's config", config)
        ItemCatalogue.from_text(catalogue, "the server's catalogue")
        if enrolled is None:
            self.store.put(ENROLMENT, json.dumps({"client": client}).encode())
        if self.store.get(CONFIG) != config.encode():
            self.store.put(CONFIG, config.encode())
        if self.store.get(CATALOGUE) != catalogue.encode():
            self.store.put(CATALOGUE, catalogue.encode())

    def enrolment(self) -> int | None:
        held = self.store.get(ENROLMENT)
        return None if held is None else int(json.loads(held)["client"])

    def config(self) -> ExperimentConfig:
        text = self._required(CONFIG).decode()
        return parse_config(yaml.safe_load(text) or {}, "the device's config", text)

    def catalogue(self) -> ItemCatalogue:
        text = self._required(CATALOGUE).decode()
        digest = _digest(text.encode())
        if self._cache.catalogue is None or self._cache.catalogue[0] != digest:
            self._cache.catalogue = (digest, ItemCatalogue.from_text(text, self.store.folder))
        return self._cache.catalogue[1]

    def accept_global(
        self, state: Mapping[str, torch.Tensor], version: int, announced: str
    ) -> None:
        """Keep the global model a round sent as the latest bundle, once its hash (recomputed
        from the tensors, config and catalogue held) is the one the server announced."""
        config, catalogue = self._required(CONFIG).decode(), self._required(CATALOGUE).decode()
        catalogue_hash = self.catalogue().content_hash
        foundation = self._foundation_hash(self.config())
        if bundle_hash(version, config, catalogue_hash, state, foundation) != announced:
            raise ValueError(
                f"the global model of round {version} does not hash to the bundle the server "
                "announced: not kept (a changed message, or this device's config or catalogue "
                "is not the server's, or its foundation another)"
            )
        bundle = ModelBundle(version, config, catalogue, catalogue_hash, dict(state), foundation)
        self.store.put(BUNDLE, bundle.to_bytes())

    def bundle(self) -> ModelBundle | None:
        data = self.store.get(BUNDLE)
        return None if data is None else ModelBundle.from_bytes(data, self.store.folder)

    # --- on-device inference -------------------------------------------------------------
    def recommend(self, k: int = 10) -> list[Recommendation]:
        """The top ``k`` items the user has not seen, from the latest global model: on this
        device, without the network."""
        model, catalogue = self._model()
        split = self._split(catalogue)
        if split.num_users == 0:
            raise ValueError(
                f"no history to recommend from: record at least {MIN_EVENTS} events of "
                "catalogue items first"
            )
        if not 1 <= k <= catalogue.num_items:
            raise ValueError(f"k must lie in 1..{catalogue.num_items}, got {k}")
        if isinstance(model, LLMRecommender):
            model.load_personal_state(self.personal.load())
            items, times = split.full(0)
            top = model.top_unseen(items, times, k, catalogue.num_items)
        else:
            users = np.zeros(1, dtype=np.int64)
            with torch.inference_mode():
                inputs, input_times = next_item_batch(split, users, model.config.max_len)
                scores = model.score_all(inputs, input_times)[0]
                scores[torch.from_numpy(np.unique(split.items))] = -torch.inf
                best = torch.topk(scores, k)
            top = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        titles = catalogue.item_features.get("title")
        return [
            Recommendation(
                catalogue.raw_item_ids[i],
                "" if titles is None else str(titles[i]),
                float(s),
            )
            for i, s in top
        ]

    # --- federated rounds ----------------------------------------------------------------
    def participation(self, round_number: int) -> str:
        """Why this device sits this training round out ("" when it takes part)."""
        config, catalogue = self.config(), self.catalogue()
        split = self._split(catalogue)
        known = int(split.offsets[-1]) if split.num_users else 0
        if known < self.policy.min_events:
            return f"{known} known events, fewer than the policy's {self.policy.min_events}"
        if config.federated.record_dp is None and not self.policy.allow_without_dp:
            return (
                "the federation sets no record-level DP (federated.record_dp): the update would "
                "have no ε bound against the server (ParticipationPolicy.allow_without_dp)"
            )
        if self.policy.condition is not None and not self.policy.condition():
            return "the app's condition (e.g. charging, idle) does not hold"
        client = self._client()
        planned = planned_release(
            self._federated(config, catalogue), split, config.federated, client, round_number
        )
        ledger = self.ledger()
        if over_budget(planned, config.federated, ledger):
            return "its next release would pass the federation's record_epsilon_budget"
        own = self.policy.epsilon_budget
        if own is not None and planned is not None:
            after = ledger.epsilon(planned.party, planned.delta, extra=planned)
            if after > own:
                return f"its next release would take ε to {after:.3g}, past the user's {own:g}"
        return ""

    def train_round(
        self,
        state: Mapping[str, torch.Tensor],
        round_number: int,
        announced: str,
        clipping_norm: float | None = None,
    ) -> ClientReply:
        """One round's local training on this device's events, from the global ``state`` (the
        model of round ``round_number - 1``, checked against the ``announced`` bundle hash):
        DP-SGD with private noise, the release in the device's ledger, the update clipped."""
        self.accept_global(state, round_number - 1, announced)
        config, catalogue = self.config(), self.catalogue()
        model = self._federated(config, catalogue)
        model.load_shared_state(state)
        client = self._client()
        reason = self.participation(round_number)
        if reason:
            log.info("round %d: not taking part: %s", round_number, reason)
            return declined_reply(config.federated, client, dict(state), clipping_norm)
        ledger = self.ledger()
        before = len(ledger.events)
        reply = train_round(
            model,
            self._split(catalogue),
            config.federated,
            partition=client,
            round_number=round_number,
            seed=config.seed,
            ledger=ledger,
            personal=self.personal,
            clipping_norm=clipping_norm,
        )
        if len(ledger.events) != before:
            self.store.put(LEDGER, json.dumps(ledger.state_dict()).encode())
        elif config.federated.record_dp is None and reply.metrics["num-examples"] != 0:
            rounds = self._unprotected_rounds()
            self.store.put(UNPROTECTED, json.dumps([*rounds, round_number]).encode())
        return reply

    def evaluate_round(
        self, state: Mapping[str, torch.Tensor], round_number: int, announced: str
    ) -> ClientReply:
        """Metrics of the global model on this device's held-out last item."""
        self.accept_global(state, round_number, announced)
        config, catalogue = self.config(), self.catalogue()
        model = self._federated(config, catalogue)
        model.load_shared_state(state)
        return evaluate_round(
            model,
            self._split(catalogue),
            config.federated,
            partition=self._client(),
            round_number=round_number,
            seed=config.seed,
            ledger=self.ledger(),
        )

    # --- the user's privacy and rights ----------------------------------------------------
    def ledger(self) -> PrivacyLedger:
        ledger = PrivacyLedger()
        held = self.store.get(LEDGER)
        if held is not None:
            ledger.load_state_dict(json.loads(held))
        return ledger

    def privacy_statement(self) -> str:
        """What this device's data has cost, in plain words."""
        client, ledger = self.enrolment(), self.ledger()
        events = (
            [] if client is None else [e for e in ledger.events if e.party == client_party(client)]
        )
        config = self.config() if self.store.get(CONFIG) is not None else None
        budget = None if config is None else config.federated.record_epsilon_budget
        own = self.policy.epsilon_budget
        limits = [b for b in (budget, own) if b is not None]
        lines = []
        unprotected = self._unprotected_rounds()
        if unprotected:
            lines.append(
                f"This device sent updates without record-level DP in {len(unprotected)} "
                f"round(s) (round {', '.join(map(str, unprotected))}): no ε bound holds for "
                "them against the server."
            )
        if not events and not unprotected:
            lines.append("This device has not released anything yet: ε spent is 0.")
        elif events:  # (only updates without DP: no ε to state)
            delta = events[-1].delta
            spent = ledger.epsilon(events[-1].party, delta)
            rounds = sorted({e.round for e in events})
            units = sorted({e.unit for e in events})
            lines.append(
                f"This device took part in {len(rounds)} federated round(s) (round "
                f"{', '.join(map(str, rounds))}). Each protects one {' / '.join(units)} of your "
                f"events with differential privacy: together they spent ε = {spent:.3g} at "
                f"δ = {delta:.2g}."
            )
            if limits:
                left = max(0.0, min(limits) - spent)
                lines.append(f"Budget: ε ≤ {min(limits):g}; {left:.3g} left.")
        if not events and limits:
            lines.append(f"Budget: ε ≤ {min(limits):g}, all of it left.")
        lines.append(
            "Forgetting your data deletes your events, personal parameters and their keys; this "
            "record of ε spent stays while the device is enrolled, because ε already spent is "
            "not refunded."
        )
        return "\n".join(lines)

    def export(self) -> dict[str, Any]:
        """Everything the store holds about the user, as JSON-ready data."""
        personal = self.personal.load()
        return {
            "events": [json.loads(r) for r in self.store.rows(EVENT)],
            "attributes": self.attributes(),
            "unknown_items": self.unknown_items() if self.store.get(CATALOGUE) else {},
            "personal_parameters": None
            if personal is None
            else {
                name: {"shape": list(t.shape), "values": t.flatten().tolist()}
                for name, t in personal.items()
            },
            "privacy": {
                "enrolled_as_client": self.enrolment(),
                "rounds_without_record_dp": self._unprotected_rounds(),
                "ledger": self.ledger().state_dict(),
                "statement": self.privacy_statement(),
            },
        }

    def forget(self, new_key: bytes | None = None) -> None:
        """Delete the user's events, attributes and personal parameters and the key they were
        sealed with; the ledger and enrolment stay (spent ε is not refunded). With ``new_key``
        (keep it, and only it, in the keystore) no earlier copy of the store opens with the key
        kept."""
        self.store.shred(kinds=(EVENT,), names=(PERSONAL, ATTRIBUTES), new_key=new_key)
        self._cache = _Cache()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _required(self, name: str) -> bytes:
        value = self.store.get(name)
        if value is None:
            raise FedrecDataError(
                f"the store holds no {name} yet: the server sends it when this device first "
                "joins a federation (fedrec device join)",
                self.store.folder,
            )
        return value

    def _foundation_files(self) -> str:
        """The foundation folder's files, sizes and times: what its digest is cached by."""
        if self.foundation is None:
            return ""
        files = sorted(p for p in self.foundation.rglob("*") if p.is_file())
        return str([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])

    def _unprotected_rounds(self) -> list[int]:
        held = self.store.get(UNPROTECTED)
        return [] if held is None else [int(r) for r in json.loads(held)]

    def _client(self) -> int:
        client = self.enrolment()
        if client is None:
            raise FedrecDataError("this device is not enrolled yet", self.store.folder)
        return client

    def _catalogue_index(self) -> Mapping[str, int] | None:
        return None if self.store.get(CATALOGUE) is None else self.catalogue().index

    def _federated(self, config: ExperimentConfig, catalogue: ItemCatalogue) -> FederatedModel:
        if config.llm is None and config.ranking is None:
            return build_federated_model(config, catalogue, self.store.folder)
        self._foundation_hash(config)  # a foundation is there
        assert self.foundation is not None
        if config.ranking is not None:  # the device's own copy of the retrieval bundle
            return ranking_model(replace(config.ranking, retrieval=str(self.foundation)), catalogue)
        assert config.llm is not None
        return new_llm_model(config.llm, catalogue, config.seed, self.foundation)

    def _foundation_hash(self, config: ExperimentConfig) -> str:
        """The digest of the frozen public folder the federation builds on, as the device holds
        it: the LLM recommender's foundation, or a ranker federation's retrieval bundle ("" for
        a sequential model)."""
        if config.llm is None and config.ranking is None:
            return ""
        what, marker = (
            ("an LLM recommender federation needs its foundation", "foundation.json")
            if config.llm is not None
            else ("a ranker federation needs its retrieval bundle", MANIFEST)
        )
        if self.foundation is None or not (self.foundation / marker).is_file():
            raise FedrecDataError(
                f"{what} on the device (node config `foundation`, `fedrec device join "
                f"--foundation DIR`); got {self.foundation}",
                self.store.folder,
            )
        key = self._foundation_files()
        if self._cache.foundation is None or self._cache.foundation[0] != key:
            self._cache.foundation = (key, foundation_digest(self.foundation))
        return self._cache.foundation[1]

    def _model(self) -> tuple[Any, ItemCatalogue]:
        bundle_data = self.store.get(BUNDLE)
        if bundle_data is None:
            raise FedrecDataError(
                "no global model yet: the device gets one in its first federated round",
                self.store.folder,
            )
        catalogue = self.catalogue()
        # A new catalogue or foundation makes the held bundle's model another: checked again.
        source = f"{_digest(bundle_data)}:{catalogue.content_hash}:{self._foundation_files()}"
        if self._cache.model is None or self._cache.model[0] != source:
            bundle = ModelBundle.from_bytes(bundle_data, self.store.folder)
            if bundle.catalogue_hash != catalogue.content_hash:
                raise FedrecDataError(
                    "the model bundle was made for another catalogue than the one held: wait "
                    "for the next round's model",
                    self.store.folder,
                )
            config = parse_config(yaml.safe_load(bundle.config) or {}, "bundle", bundle.config)
            if config.ranking is not None:
                raise FedrecDataError(
                    "this federation trains the funnel's ranker: its recommendations come from "
                    "the service (`fedrec serve --bundle RUN/serving`), not from the device",
                    self.store.folder,
                )
            if self._foundation_hash(config) != bundle.foundation_hash:
                raise FedrecDataError(
                    f"the model bundle was made with foundation {bundle.foundation_hash[:12]}, "
                    f"the device holds {self.foundation}: fetch the server's foundation",
                    self.store.folder,
                )
            federated = self._federated(config, catalogue)
            federated.load_shared_state(bundle.state)
            assert isinstance(federated, SequentialFederatedModel | LLMFederatedModel)
            federated.model.eval()
            self._cache.model = (source, federated.model)
        return self._cache.model[1], catalogue


def dataset_history(dataset: InteractionDataset, raw_user: str) -> list[Event]:
    """One user's events in a data set, in raw ids, with their ratings when the data set has
    them, as their device would have recorded them (``fedrec device import``: a device that
    starts with the user's past history)."""
    rows = _user_rows(dataset, raw_user)
    rows = rows[np.argsort(dataset.timestamps[rows], kind="stable")]
    ratings = dataset.ratings
    return [
        (
            str(dataset.raw_item_ids[dataset.item_ids[r]]),
            int(dataset.timestamps[r]),
            "rating",
            None if ratings is None else float(ratings[r]),
        )
        for r in rows.tolist()
    ]


def dataset_attributes(dataset: InteractionDataset, raw_user: str) -> dict[str, str]:
    """One user's attributes in a data set (what ``set_attributes`` keeps on their device)."""
    row = dataset.user_ids[_user_rows(dataset, raw_user)[0]]
    return {name: str(values[row]) for name, values in dataset.user_features.items()}


def _user_rows(dataset: InteractionDataset, raw_user: str) -> np.ndarray:
    users = {str(u): i for i, u in enumerate(dataset.raw_user_ids.tolist())}
    if str(raw_user) not in users:
        raise ValueError(f"user {raw_user!r} is not in {dataset.name or 'the data set'}")
    return np.flatnonzero(dataset.user_ids == users[str(raw_user)])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
