"""``fedrec privacy-audit RUN``: attacks that try to break a run's claimed privacy.

Two attacks on the trained sequential model (HSTU, SASRec), from a central run (``best.pt``)
or a federated one (``model.pt``) whose config held users out (``privacy_audit``):

- **user-level membership inference**: score = −(mean full-softmax cross-entropy of the model
  on the user's training sequence); members are trained users, non-members the held-out ones
  (the same distribution). Reported: AUC with a bootstrap interval, a permutation p-value, and
  the empirical ε lower bound from the ROC against the run's user-level (ε, δ): any
  (ε, δ)-DP training forces TPR ≤ e^ε·FPR + δ at every threshold.
- **canary exposure**: members whose training history was replaced by a random sequence;
  exposure = log2(R+1) − log2(rank of the canary's score among R random sequences never
  trained on), Carlini et al. 2019.

The attack math lives in ``fedrec.privacy.attacks``; this module loads a run and scores users.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from fedrec.config import ExperimentConfig, parse_config
from fedrec.data import prepare_split
from fedrec.data.batching import training_batch
from fedrec.data.membership import canary_users, held_out, plant_canaries, random_sequences
from fedrec.data.split import SequenceSplit
from fedrec.errors import FedrecDataError
from fedrec.experiment import write_json_atomic
from fedrec.files import load_checkpoint
from fedrec.models import build_model
from fedrec.models.base import SequentialRecommender
from fedrec.privacy import attacks
from fedrec.training import trainable_users


def run_config(run_dir: Path) -> ExperimentConfig:
    """The experiment config a finished run folder was trained with."""
    if (run_dir / "config.yaml").exists():  # a central run
        source = run_dir / "config.yaml"
        return parse_config(yaml.safe_load(source.read_text("utf-8")), str(source))
    results = run_dir / "results.json"
    if not results.exists():
        raise FedrecDataError("not a run folder: no config.yaml or results.json", run_dir)
    return parse_config(json.loads(results.read_text("utf-8"))["config"], str(results))


def load_model(run_dir: Path, config: ExperimentConfig, num_items: int) -> SequentialRecommender:
    """The run's final (federated ``model.pt``) or best-validated (central ``best.pt``) model."""
    if config.llm is not None:
        raise FedrecDataError(
            "privacy-audit scores HSTU/SASRec runs; this run trained the LLM recommender", run_dir
        )
    model = build_model(config.model_name, num_items, config.model)
    path = run_dir / "model.pt" if (run_dir / "model.pt").exists() else run_dir / "best.pt"
    if not path.exists():
        raise FedrecDataError("no model.pt (federated) or best.pt (central) to audit", run_dir)
    state = load_checkpoint(path)
    model.load_state_dict(state.get("model", state))
    return model.eval()


def claimed_user_level(run_dir: Path) -> tuple[float, float, str]:
    """The run's user-level (ε, δ) from privacy.json; ε = ∞ when it claims none."""
    path = run_dir / "privacy.json"
    summary = json.loads(path.read_text("utf-8")) if path.exists() else {}
    if "guarantees" not in summary and summary.get("federation"):  # written before version 2
        old = summary["federation"]
        return (
            float(old["epsilon"]),
            float(old["delta"]),
            "user-level DP as reported before fedrec accounted the sampling it ran (fixed-size "
            "cohorts accounted as Poisson: this ε may be under-reported)",
        )
    for guarantee in summary.get("guarantees", []):
        if guarantee["level"].startswith("user-level"):
            return float(guarantee["epsilon"]), float(guarantee["delta"]), "user-level DP"
    if summary.get("guarantees"):
        return (
            math.inf,
            1e-5,
            "device-level guarantees only (records or audit histograms): they do not bound what "
            "the model reveals about a whole user",
        )
    return math.inf, 1e-5, "no differential privacy"


@torch.no_grad()
def sequence_scores(model: SequentialRecommender, batch: tuple[torch.Tensor, ...]) -> np.ndarray:
    """−(mean full-softmax cross-entropy) per sequence: higher means better fitted."""
    full = dataclasses.replace(model.config, loss="full_softmax")  # exact, not sampled
    sampled, model.config = model.config, full
    try:
        losses, valid = model.position_losses(*batch)
    finally:
        model.config = sampled
    return (-(losses.sum(1) / valid.sum(1).clamp(min=1))).numpy()


def _user_scores(
    model: SequentialRecommender, split: SequenceSplit, users: np.ndarray, batch: int = 256
) -> np.ndarray:
    return np.concatenate(
        [
            sequence_scores(
                model, training_batch(split, users[i : i + batch], model.config.max_len)
            )
            for i in range(0, len(users), batch)
        ]
        or [np.zeros(0)]
    )


def _as_split(sequences: np.ndarray, times: np.ndarray, num_items: int) -> SequenceSplit:
    """Sequences as users of a split (two dummy held-out items each, never scored)."""
    count, length = sequences.shape
    items = np.concatenate([sequences, np.zeros((count, 2), np.int64)], axis=1).reshape(-1)
    stamps = np.tile(np.concatenate([times, times[-1:].repeat(2)]), count)
    offsets = np.arange(count + 1, dtype=np.int64) * (length + 2)
    return SequenceSplit(count, num_items, offsets, items, stamps)


def canary_exposures(
    model: SequentialRecommender,
    split: SequenceSplit,
    canaries: np.ndarray,
    references: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    out = []
    for user in canaries.tolist():
        times = split.train_sequence(user)[1]
        reference = _as_split(
            random_sequences(split, user, references, rng), times, split.num_items
        )
        ref_scores = _user_scores(model, reference, np.arange(references))
        score = _user_scores(model, split, np.array([user]))
        exposure = float(attacks.canary_exposure(score, ref_scores)[0])
        out.append({"user": int(user), "exposure": exposure})
    return out


def run_privacy_audit(
    run_dir: Path,
    max_users: int = 1000,
    references: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Both attacks on ``run_dir``; writes ``privacy_audit.json`` there and returns it."""
    config = run_config(run_dir)
    audit = config.privacy_audit
    if audit.holdout_fraction <= 0:
        raise FedrecDataError(
            "the run trained on every user, so there are no non-members to compare with: "
            "rerun it with privacy_audit.holdout_fraction > 0 (e.g. 0.5)",
            run_dir,
        )
    _, split = prepare_split(config.data)
    split = plant_canaries(split, audit, config.seed)
    model = load_model(run_dir, config, split.num_items)
    rng = np.random.default_rng(seed)
    outside = held_out(split.num_users, audit, config.seed)
    planted = canary_users(split.num_users, audit, config.seed)
    candidates = trainable_users(split)
    members = np.setdiff1d(candidates[~outside[candidates]], planted)
    nonmembers = candidates[outside[candidates]]
    members = np.sort(rng.permutation(members)[:max_users])
    nonmembers = np.sort(rng.permutation(nonmembers)[:max_users])
    epsilon, delta, claim = claimed_user_level(run_dir)
    steps = tqdm(total=2 + len(planted), desc="privacy audit", disable=not progress)
    member_scores = _user_scores(model, split, members)
    steps.update()
    nonmember_scores = _user_scores(model, split, nonmembers)
    steps.update()
    # With this many users even a perfect attack certifies only so much ε: claims above it
    # cannot be contradicted by this audit.
    ceiling = attacks.empirical_epsilon(
        np.ones(len(members)), np.zeros(len(nonmembers)), delta
    ).epsilon_lower
    report: dict[str, Any] = {
        "run": str(run_dir),
        "claimed": {"epsilon": epsilon, "delta": delta, "what": claim},
        "membership": attacks.mia_report(member_scores, nonmember_scores, epsilon, delta, rng),
        "largest_certifiable_epsilon": ceiling,
        "score": "−(mean full-softmax cross-entropy on the user's training sequence)",
    }
    if len(planted):
        exposures = canary_exposures(model, split, planted, references, rng)
        steps.update(len(planted))
        report["canaries"] = {
            "count": len(planted),
            "references": references,
            "max_possible_exposure": attacks.max_exposure(references),
            "exposure": exposures,
            "exposure_median": float(np.median([e["exposure"] for e in exposures])),
        }
    steps.close()
    write_json_atomic(report, run_dir / "privacy_audit.json")
    return report
