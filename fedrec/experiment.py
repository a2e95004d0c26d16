"""The centralized experiment: load → preprocess → split → train → evaluate → results.json."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from fedrec.config import ExperimentConfig
from fedrec.data import prepare_split
from fedrec.data.membership import held_out, plant_canaries
from fedrec.evaluation import evaluate, popularity_scorer
from fedrec.models import build_model
from fedrec.training import evaluate_model, fit, resolve_device, seed_everything


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    versions: dict[str, str | None] = {}
    for package in ("fedrec", "torch", "numpy", "flwr", "opacus", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def write_json_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def run_centralized(config: ExperimentConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one experiment; writes ``config.yaml``, ``best.pt`` and ``results.json`` to ``run_dir``."""
    wall_start = time.perf_counter()
    run_dir = Path(run_dir or config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8"
    )

    dataset, split = prepare_split(config.data)
    audit = config.privacy_audit
    split = plant_canaries(split, audit, config.seed)
    seed_everything(config.seed)
    model = build_model(config.model_name, split.num_items, config.model)
    fitted = fit(
        model,
        split,
        config.train,
        config.evaluation,
        config.seed,
        checkpoint=run_dir / "best.pt",
        checkpoint_extra={"config": config.to_dict(), "num_items": split.num_items},
        exclude=held_out(split.num_users, audit, config.seed),
    )
    test = evaluate_model(
        model, split, "test", config.evaluation, resolve_device(config.train.device)
    )
    popularity = evaluate(popularity_scorer(split), split, "test", config.evaluation)
    results = {
        "model": config.model_name,
        "seed": config.seed,
        "data": dataset.summary(),
        "test": test.metrics,
        "valid": fitted.best_valid,
        "baselines": {"popularity": {"test": popularity.metrics}},
        "best_epoch": fitted.best_epoch,
        "epochs_run": fitted.epochs_run,
        "seconds_per_epoch": fitted.seconds_per_epoch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": time.perf_counter() - wall_start,
        "history": fitted.history,
        "config": config.to_dict(),
        "environment": environment(),
    }
    write_json_atomic(results, run_dir / "results.json")
    return results
