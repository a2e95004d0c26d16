"""The aggregator's model store: one versioned serving bundle holds what the funnel runs.

A serving bundle is a folder of parts, each a file hashed (SHA-256) in ``serving.json``:

- ``model.bundle``: the round's ``ModelBundle`` (the global sequential model, the experiment
  config and the catalogue with its semantic-ID codes and popularity; it verifies itself);
- ``ranker.safetensors``: the multi-task ranker's weights (its config is in the manifest);
- ``retrieval.safetensors``: the semantic-ID model, generative retrieval over the catalogue's
  codes (its config and vocabulary sizes are in the manifest; a tied output layer is not
  stored twice);
- ``llm.bundle``: an LLM recommender federation's round, as its own ``ModelBundle`` (the
  global adapters, the run's config and catalogue, and the digest of the foundation they
  need: the foundation itself is large and public and is not copied into every bundle);

and the manifest also carries the funnel's settings, the user-attribute vocabularies (the
public schema of the ranker's user features) and the ledger's (ε, δ) snapshot at that round.
``content_hash`` is a digest of the manifest's canonical JSON, so one string names the whole
bundle. Loading verifies every part against its hash before anything is built from it: a
service never serves a corrupt, truncated or half-written bundle. The hashes are integrity,
not authenticity: whoever can write the bundle folder can write a consistent bundle (the
folder is the aggregator's own; signing bundles is not done).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecDataError
from fedrec.models.base import SequentialRecommender
from fedrec.models.ranking import MultiTaskRanker, RankerConfig, ranker_class
from fedrec.models.registry import build_model, model_config
from fedrec.semantic_id.retrieval import CodeVocabulary, RetrievalConfig
from fedrec.semantic_id.retrieval import build_model as build_retrieval_model
from fedrec.serving.bundle import ModelBundle
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables, popularity_counts
from fedrec.serving.funnel import FunnelConfig, Source
from fedrec.serving.sources import (
    LLM_SOURCE,
    SEMANTIC_ID_SOURCE,
    SequentialEncoder,
    generative_source,
    popularity_source,
    sequential_source,
)

SERVING_FORMAT = "fedrec-serving/1"
MANIFEST, MODEL_PART, RANKER_PART = "serving.json", "model.bundle", "ranker.safetensors"
RETRIEVAL_PART, LLM_PART = "retrieval.safetensors", "llm.bundle"
TIED_OUTPUT = "lm_head.weight"  # transformers' output layer, tied to the input embedding
SERVING_DIR = "serving"  # RUN/serving/v<round>/: a federation's bundles


# The ε a bundle states first, from a federation's ``epsilons_so_far``: user-level when the
# federation has it, else the most any client spent at record level.
PRIVACY_SCOPES = (
    ("federation", "user-level (the federation)"),
    ("client_max", "record-level (the most any client spent)"),
)


@dataclass
class ServingConfig:
    """A federation writes a serving bundle after every round (``RUN/serving/v<round>/``, the
    ``keep`` newest kept), which ``fedrec serve --bundle RUN/serving`` swaps in as it appears.
    It holds the round's global model and the ledger's ε at that round: a federation of the
    sequential model serves its retrieval (``rank: false``); a federation of the ranker
    (a ``ranking`` section) serves its frozen retrieval and the round's ranker; a federation
    of the LLM recommender serves the frozen serving bundle ``retrieval`` (relative to the
    working directory) with the round's adapters as the ``llm`` source."""

    funnel: FunnelConfig = field(default_factory=lambda: FunnelConfig(("hstu", "popularity")))
    keep: int = 3
    retrieval: str = ""

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError("serving.keep must be >= 1 (the newest bundle is always kept)")


@dataclass
class GenerativeRetriever:
    """The semantic-ID model: a transformers causal LM over the catalogue's code tokens."""

    model: Any
    vocabulary: CodeVocabulary
    config: RetrievalConfig


@dataclass
class ServingBundle:
    """What the funnel runs, loaded and verified. ``privacy``: the ledger's ε (and δ) at the
    bundle's round, as ``fedrec.federation.privacy.epsilons_so_far`` names them; empty when the
    run claims no DP."""

    version: int
    content_hash: str
    part_hashes: dict[str, str]
    model_name: str
    sequential: SequentialRecommender
    catalogue: ItemCatalogue
    ranker: MultiTaskRanker | None
    tables: FeatureTables
    funnel: FunnelConfig
    privacy: dict[str, float]
    model_bundle: ModelBundle
    retriever: GenerativeRetriever | None = None
    llm: ModelBundle | None = None  # an LLM federation's round (built with its foundation)

    @property
    def epsilon(self) -> tuple[float, float, str]:
        """(ε, δ, what it bounds) to state first; (∞, 0, "no DP claimed") without one."""
        for key, scope in PRIVACY_SCOPES:
            if key in self.privacy:
                return self.privacy[key], self.privacy.get(f"{key}_delta", 0.0), scope
        return math.inf, 0.0, "no DP claimed"


def bundle_sources(
    bundle: ServingBundle, device: torch.device, n: int
) -> tuple[SequentialEncoder, dict[str, Source]]:
    """``bundle``'s retrieval sources on ``device``, each proposing ``n`` items, and the
    encoder they share. Copies: two users of one bundle (CPU and CUDA) never move each other's
    models."""
    encoder = SequentialEncoder(copy.deepcopy(bundle.sequential).to(device), device)
    sources = {
        bundle.model_name: sequential_source(encoder, n),
        "popularity": popularity_source(popularity_counts(bundle.catalogue), n),
    }
    if bundle.retriever is not None:
        retriever = bundle.retriever
        sources[SEMANTIC_ID_SOURCE] = generative_source(
            copy.deepcopy(retriever.model).to(device), retriever.vocabulary, retriever.config, n
        )
    return encoder, sources


def write_serving_bundle(
    folder: Path,
    model_bundle: ModelBundle,
    model_name: str,
    model_options: dict[str, Any],
    ranker: MultiTaskRanker | None,
    vocabularies: tuple[tuple[str, ...], ...],
    funnel: FunnelConfig,
    privacy: Mapping[str, float] | None = None,
    retriever: GenerativeRetriever | None = None,
    llm: ModelBundle | None = None,
) -> str:
    """Write a serving bundle into the new folder ``folder``; returns its content hash. The
    manifest goes last, so a folder without one is an unfinished write. ``retriever``'s codes
    must be the catalogue's; ``llm``'s catalogue must list the same items."""
    if llm is not None:
        listed = ItemCatalogue.from_text(llm.catalogue, LLM_PART).raw_item_ids
        if listed != ItemCatalogue.from_text(model_bundle.catalogue, MODEL_PART).raw_item_ids:
            raise ValueError("the LLM recommender's catalogue lists other items than the bundle's")
    if retriever is not None:
        codes = ItemCatalogue.from_text(model_bundle.catalogue, folder / MODEL_PART).codes
        vocabulary = retriever.vocabulary
        if not codes or not np.array_equal(
            np.asarray(codes) + vocabulary.offsets, vocabulary.tokens
        ):
            raise ValueError("the semantic-ID model's codes are not the catalogue's codes")
    folder.mkdir(parents=True, exist_ok=False)
    parts = {MODEL_PART: model_bundle.to_bytes()}
    if ranker is not None:
        parts[RANKER_PART] = save_tensors(_plain(ranker.state_dict()))
    if retriever is not None:
        state = retriever.model.state_dict()
        if retriever.model.config.tie_word_embeddings:
            state.pop(TIED_OUTPUT, None)  # the input embedding's own tensor
        parts[RETRIEVAL_PART] = save_tensors(_plain(state))
    if llm is not None:
        parts[LLM_PART] = llm.to_bytes()
    for name, data in parts.items():
        (folder / name).write_bytes(data)
    manifest: dict[str, Any] = {
        "format": SERVING_FORMAT,
        "version": model_bundle.version,
        "parts": {name: hashlib.sha256(data).hexdigest() for name, data in parts.items()},
        "model": {"name": model_name, "options": model_options},
        "ranker": None if ranker is None else _ranker_json(ranker.config),
        "vocabularies": [list(v) for v in vocabularies],
        "funnel": asdict(funnel),
        "semantic_id": None
        if retriever is None
        else {
            "codebook_size": retriever.vocabulary.codebook_size,
            "extra_vocab": retriever.vocabulary.extra_vocab,
            "retrieval": asdict(retriever.config),
        },
        # ∞ (a noiseless release) as null: the manifest stays strict JSON.
        "privacy": {k: None if math.isinf(v) else v for k, v in (privacy or {}).items()},
    }
    manifest["content_hash"] = _manifest_hash(manifest)
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return str(manifest["content_hash"])


def load_serving_bundle(folder: Path) -> ServingBundle:
    """Read and verify a serving bundle: any doubt is a ``FedrecDataError`` naming the file."""
    path = folder / MANIFEST
    if not path.exists():
        raise FedrecDataError(
            f"no {MANIFEST} here: not a serving bundle, or one still being written "
            "(write one with simulations/bench_funnel.py --bundle-out DIR)",
            folder,
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
        parts = {name: (folder / name).read_bytes() for name in manifest["parts"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedrecDataError(f"unreadable serving bundle ({err})", path) from None
    if manifest.get("format") != SERVING_FORMAT:
        raise FedrecDataError(f"format {manifest.get('format')!r}, expected {SERVING_FORMAT}", path)
    if _manifest_hash(manifest) != manifest.get("content_hash"):
        raise FedrecDataError("the manifest does not match its content_hash", path)
    for name, data in parts.items():
        if hashlib.sha256(data).hexdigest() != manifest["parts"][name]:
            raise FedrecDataError(
                "this part does not match its hash in serving.json", folder / name
            )
    model_bundle = ModelBundle.from_bytes(parts[MODEL_PART], folder / MODEL_PART)
    try:
        return _build(manifest, parts, model_bundle, folder)
    except FedrecDataError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        # A manifest that hashes right but does not build (written by another version, or
        # by hand): refused like a corrupt one, never a crash of whoever loads it.
        raise FedrecDataError(
            f"the bundle does not build ({type(err).__name__}: {err})", path
        ) from None


def _build(
    manifest: dict[str, Any], parts: dict[str, bytes], model_bundle: ModelBundle, folder: Path
) -> ServingBundle:
    catalogue = ItemCatalogue.from_text(model_bundle.catalogue, folder / MODEL_PART)
    spec = manifest["model"]
    sequential = build_model(
        spec["name"], catalogue.num_items, model_config(spec["name"], spec["options"])
    )
    sequential.load_state_dict(model_bundle.state)
    # A bundle without a ranker has no user features: no vocabularies.
    listed = manifest["vocabularies"] or [[""]] * len(USER_ATTRIBUTES)
    vocabularies = {a: v[1:] for a, v in zip(USER_ATTRIBUTES, listed, strict=True)}
    tables = FeatureTables.build(catalogue, vocabularies)
    ranker = None
    if manifest["ranker"] is not None:
        ranker = ranker_class("mmoe-dcn")(RankerConfig(**manifest["ranker"]))
        ranker.load_state_dict(load_tensors(parts[RANKER_PART]))
        ranker.eval()
    retriever = None
    if manifest.get("semantic_id") is not None:  # absent from bundles older than the field
        retriever = _retriever(manifest["semantic_id"], parts[RETRIEVAL_PART], catalogue)
    llm = None
    if LLM_PART in parts:
        llm = ModelBundle.from_bytes(parts[LLM_PART], folder / LLM_PART)
        if ItemCatalogue.from_text(llm.catalogue, LLM_PART).raw_item_ids != catalogue.raw_item_ids:
            raise ValueError("the LLM recommender's catalogue lists other items than the bundle's")
    return ServingBundle(
        version=int(manifest["version"]),
        content_hash=str(manifest["content_hash"]),
        part_hashes=dict(manifest["parts"]),
        model_name=spec["name"],
        sequential=sequential.eval(),
        catalogue=catalogue,
        ranker=ranker,
        tables=tables,
        funnel=FunnelConfig(**manifest["funnel"]),
        privacy={k: math.inf if v is None else float(v) for k, v in manifest["privacy"].items()},
        model_bundle=model_bundle,
        retriever=retriever,
        llm=llm,
    )


def _retriever(spec: dict[str, Any], data: bytes, catalogue: ItemCatalogue) -> GenerativeRetriever:
    if not catalogue.codes:
        raise ValueError("the bundle has a semantic-ID model, but its catalogue has no codes")
    vocabulary = CodeVocabulary(
        np.asarray(catalogue.codes, dtype=np.int64),
        int(spec["codebook_size"]),
        int(spec["extra_vocab"]),
    )
    config = RetrievalConfig(**spec["retrieval"])
    with torch.random.fork_rng(devices=[]):  # it seeds its initial weights: not our RNG
        model = build_retrieval_model(vocabulary, config)
    missing, unexpected = model.load_state_dict(load_tensors(data), strict=False)
    tied = {TIED_OUTPUT} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"the semantic-ID model's tensors do not fit its config (missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    return GenerativeRetriever(model.eval(), vocabulary, config)


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def publish_round(
    root: Path,
    model_bundle: ModelBundle,
    model_name: str,
    model_options: dict[str, Any],
    config: ServingConfig,
    privacy: Mapping[str, float],
    ranker: MultiTaskRanker | None = None,
    vocabularies: tuple[tuple[str, ...], ...] = (),
    retriever: GenerativeRetriever | None = None,
    llm: ModelBundle | None = None,
) -> Path:
    """The federation's serving bundle of ``model_bundle``'s round in ``root/v<round>/``
    (written aside and renamed into place: a reader sees all of it or none), then only the
    ``config.keep`` newest versions are kept."""
    target = root / f"v{model_bundle.version:06d}"
    aside = root / f".{target.name}.partial"
    shutil.rmtree(aside, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    write_serving_bundle(
        aside,
        model_bundle,
        model_name,
        model_options,
        ranker,
        vocabularies,
        config.funnel,
        privacy,
        retriever,
        llm,
    )
    shutil.rmtree(target, ignore_errors=True)  # a resumed run publishes its round again
    os.replace(aside, target)
    versions = sorted(p for p in root.glob("v[0-9]*") if p.is_dir())
    for old in versions[: -config.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def publish_over_retrieval(
    root: Path,
    retrieval: ServingBundle,
    version: int,
    config: ServingConfig,
    privacy: Mapping[str, float],
    ranker: MultiTaskRanker | None = None,
    vocabularies: tuple[tuple[str, ...], ...] = (),
    llm: ModelBundle | None = None,
) -> Path:
    """The round's serving bundle of a federation that trains no sequential model: the frozen
    ``retrieval`` bundle's model and semantic-ID model (its model bundle renumbered to
    ``version``) with what the round trained (the ranker, or an LLM federation's bundle).
    ``config.funnel`` must name sources the result has, before the first round is run."""
    served = {retrieval.model_name, "popularity"}
    served |= {SEMANTIC_ID_SOURCE} if retrieval.retriever is not None else set()
    served |= {LLM_SOURCE} if llm is not None else set()
    if not set(config.funnel.sources) <= served:
        raise ValueError(
            f"serving.funnel.sources {list(config.funnel.sources)}: this federation's bundles "
            f"serve {sorted(served)}"
        )
    return publish_round(
        root,
        replace(retrieval.model_bundle, version=version),
        retrieval.model_name,
        asdict(retrieval.sequential.config),
        config,
        privacy,
        ranker,
        vocabularies,
        retrieval.retriever,
        llm,
    )


def _ranker_json(config: RankerConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _manifest_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()
