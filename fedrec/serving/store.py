"""The aggregator's model store: one versioned serving bundle holds what the funnel runs.

A serving bundle is a folder of parts, each a file hashed (SHA-256) in ``serving.json``:

- ``model.bundle``: the round's ``ModelBundle`` (the global sequential model, the experiment
  config and the catalogue with its semantic-ID codes and popularity; it verifies itself);
- ``ranker.safetensors``: the multi-task ranker's weights (its config is in the manifest);

and the manifest also carries the funnel's settings, the user-attribute vocabularies (the
public schema of the ranker's user features) and the ledger's (ε, δ) snapshot at that round.
``content_hash`` is a digest of the manifest's canonical JSON, so one string names the whole
bundle. Loading verifies every part against its hash before anything is built from it: a
service never serves a half-written or altered bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecDataError
from fedrec.models.base import SequentialRecommender
from fedrec.models.ranking import MultiTaskRanker, RankerConfig, ranker_class
from fedrec.models.registry import build_model, model_config
from fedrec.serving.bundle import ModelBundle
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables
from fedrec.serving.funnel import FunnelConfig

SERVING_FORMAT = "fedrec-serving/1"
MANIFEST, MODEL_PART, RANKER_PART = "serving.json", "model.bundle", "ranker.safetensors"


@dataclass
class ServingBundle:
    """What the funnel runs, loaded and verified. ``epsilon`` is ∞ when the run claims no DP."""

    version: int
    content_hash: str
    part_hashes: dict[str, str]
    model_name: str
    sequential: SequentialRecommender
    catalogue: ItemCatalogue
    ranker: MultiTaskRanker | None
    tables: FeatureTables
    funnel: FunnelConfig
    epsilon: float
    delta: float


def write_serving_bundle(
    folder: Path,
    model_bundle: ModelBundle,
    model_name: str,
    model_options: dict[str, Any],
    ranker: MultiTaskRanker | None,
    vocabularies: tuple[tuple[str, ...], ...],
    funnel: FunnelConfig,
    epsilon: float = math.inf,
    delta: float = 0.0,
) -> str:
    """Write a serving bundle into the new folder ``folder``; returns its content hash. The
    manifest goes last, so a folder without one is an unfinished write."""
    folder.mkdir(parents=True, exist_ok=False)
    parts = {MODEL_PART: model_bundle.to_bytes()}
    if ranker is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in ranker.state_dict().items()}
        parts[RANKER_PART] = save_tensors(state)
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
        "privacy": {"epsilon": None if math.isinf(epsilon) else epsilon, "delta": delta},
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
    catalogue = ItemCatalogue.from_text(model_bundle.catalogue, folder / MODEL_PART)
    spec = manifest["model"]
    sequential = build_model(
        spec["name"], catalogue.num_items, model_config(spec["name"], spec["options"])
    )
    sequential.load_state_dict(model_bundle.state)
    vocabularies = {
        a: v[1:] for a, v in zip(USER_ATTRIBUTES, manifest["vocabularies"], strict=True)
    }
    tables = FeatureTables.build(catalogue, vocabularies)
    ranker = None
    if manifest["ranker"] is not None:
        config = RankerConfig(**manifest["ranker"])
        ranker = ranker_class("mmoe-dcn")(config)
        try:
            ranker.load_state_dict(load_tensors(parts[RANKER_PART]))
        except (SafetensorError, RuntimeError) as err:
            raise FedrecDataError(
                f"ranker weights do not fit ({err})", folder / RANKER_PART
            ) from None
        ranker.eval()
    privacy = manifest["privacy"]
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
        epsilon=math.inf if privacy["epsilon"] is None else float(privacy["epsilon"]),
        delta=float(privacy["delta"]),
    )


def popularity_counts(catalogue: ItemCatalogue) -> np.ndarray:
    return np.asarray(catalogue.popularity or [0] * catalogue.num_items, dtype=np.float64)


def _ranker_json(config: RankerConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _manifest_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()
