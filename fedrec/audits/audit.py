"""One round's audit: user-side group gaps, item-side exposure, calibration, threshold checks."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.audits import metrics as m
from fedrec.audits.groups import user_groups
from fedrec.audits.rerank import RERANKERS
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.evaluator import EvalConfig, EvalResult, Reranker, Scorer, evaluate

log = logging.getLogger("fedrec.audit")

MODES = ("server", "federated")


@dataclass
class RerankConfig:
    """Re-rank each user's top ``top_n`` before the top-K is shown: ``calibrated`` (Steck),
    ``long-tail`` (xQuAD towards equal head/tail exposure) or ``long-tail-personal`` (xQuAD
    towards each user's own tail share); ``lam`` ∈ [0, 1] trades accuracy for the objective."""

    method: str = "calibrated"
    lam: float = 0.5
    top_n: int = 100

    def __post_init__(self) -> None:
        if self.method not in RERANKERS:
            raise ValueError(f"audit.rerank.method must be one of {sorted(RERANKERS)}")
        if not 0 <= self.lam <= 1:
            raise ValueError("audit.rerank.lam must lie in [0, 1]")
        if self.top_n < 1:
            raise ValueError("audit.rerank.top_n must be >= 1")


@dataclass
class AuditConfig:
    """What the per-round audit measures and when it raises the alarm.

    ``mode``: ``server`` evaluates the global model on every user's held-out item on the server
    (research mode, simulation only); ``federated`` has every sampled client compute its own
    group sums and top-K exposure and return them in its evaluate reply, the server only adds
    them up. ``exposure_noise`` > 0 adds Gaussian noise N(0, σ²) to each client's exposure
    histogram (a top-K list is personal data); it is recorded in the privacy ledger.
    Thresholds: ``max_gap`` per metric (``{"NDCG@10": 0.05}``) is breached when the lower end
    of the gap's confidence interval exceeds it, so a small group's noise raises no alarm;
    groups under ``min_group_size`` users are reported but not compared. With
    ``exposure_noise`` an item counts as shown (coverage, Gini, entropy) only above three
    standard deviations of the summed noise.
    ``min_coverage``, ``max_gini``, ``min_aplt``, ``max_calibration_kl`` on the point values.
    ``stop_on_breach`` stops the run after the audit that found a breach.
    """

    enabled: bool = True
    mode: str = "server"
    stage: str = "test"
    k: int = 10
    attributes: tuple[str, ...] = ("gender", "age", "occupation")
    metrics: tuple[str, ...] = ("HR@10", "NDCG@10", "MRR")
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    min_group_size: int = 10
    tail_share: float = 0.2
    calibration_alpha: float = 0.01
    max_gap: dict[str, float] = field(default_factory=dict)
    min_coverage: float | None = None
    max_gini: float | None = None
    min_aplt: float | None = None
    max_calibration_kl: float | None = None
    stop_on_breach: bool = False
    exposure_noise: float = 0.0
    rerank: RerankConfig | None = None

    def __post_init__(self) -> None:
        self.attributes, self.metrics = tuple(self.attributes), tuple(self.metrics)
        if self.mode not in MODES:
            raise ValueError(f"audit.mode must be one of {MODES}, got {self.mode!r}")
        if self.stage not in ("valid", "test"):
            raise ValueError("audit.stage must be 'valid' or 'test'")
        if self.k < 1 or self.bootstrap_resamples < 10 or not 0 < self.confidence < 1:
            raise ValueError("audit: k >= 1, bootstrap_resamples >= 10, 0 < confidence < 1")
        if self.min_group_size < 1:
            raise ValueError("audit.min_group_size must be >= 1")
        if not 0 < self.tail_share < 1 or not 0 < self.calibration_alpha < 1:
            raise ValueError("audit: tail_share and calibration_alpha must lie in (0, 1)")
        if self.exposure_noise < 0:
            raise ValueError("audit.exposure_noise must be >= 0")
        unknown = [name for name in self.max_gap if name not in self.metrics]
        if unknown:
            raise ValueError(f"audit.max_gap names metrics not audited: {unknown}")
        if self.rerank is not None and self.rerank.top_n < self.k:
            raise ValueError("audit.rerank.top_n must be >= audit.k")
        if self.enabled and self.mode == "federated":
            log.warning(
                "audit.mode federated: each client sends its group sums (its groups, metrics and "
                "the rank of its test item) un-noised%s; they are outside the privacy ledger and "
                "the privacy report lists them as not covered",
                ""
                if self.exposure_noise > 0
                else ", and its top-K histogram (audit.exposure_noise)",
            )


@dataclass
class AuditContext:
    """What every round's audit needs from the data, computed once per run."""

    split: SequenceSplit
    stage: Stage
    groups: dict[str, np.ndarray]  # attribute -> label per user
    popularity: np.ndarray  # training interactions per item
    tail: np.ndarray  # long-tail mask
    genres: np.ndarray | None  # p(genre | item), None without genre data

    @classmethod
    def build(
        cls, dataset: InteractionDataset, split: SequenceSplit, config: AuditConfig
    ) -> AuditContext:
        """The population's context (the server's audit, and each simulated user's groups)."""
        stage: Stage = "valid" if config.stage == "valid" else "test"
        groups = user_groups(dataset.user_features, split.history_lengths(stage), config.attributes)
        return cls.from_parts(
            split, config, groups, split.train_item_counts(), dataset.item_features.get("genres")
        )

    @classmethod
    def from_parts(
        cls,
        split: SequenceSplit,
        config: AuditConfig,
        groups: dict[str, np.ndarray],
        popularity: np.ndarray,
        genre_column: np.ndarray | None,
    ) -> AuditContext:
        """A context from its parts: a client's own split and group labels with the item
        popularity and genres the server's catalogue publishes."""
        return cls(
            split=split,
            stage="valid" if config.stage == "valid" else "test",
            groups=groups,
            popularity=popularity,
            tail=m.long_tail_items(popularity, config.tail_share),
            genres=None if genre_column is None else m.genre_matrix(genre_column)[0],
        )

    def evaluate(self, scorer: Scorer, config: AuditConfig, evaluation: EvalConfig) -> EvalResult:
        """Rank every item for this context's users at the audited stage, with the top-K lists
        the audit reads (re-ranked when ``config.rerank`` asks)."""
        top_n = config.rerank.top_n if config.rerank is not None else config.k
        return evaluate(
            scorer, self.split, self.stage, evaluation, top_n=top_n, rerank=self.reranker(config)
        )

    def reranker(self, config: AuditConfig) -> Reranker | None:
        if config.rerank is None:
            return None
        r = config.rerank
        if r.method == "calibrated":
            if self.genres is None:
                raise ValueError("calibrated re-ranking needs item genres, and the data has none")
            return RERANKERS[r.method](self.split, self.genres, config.k, r.lam)
        return RERANKERS[r.method](self.split, self.tail, config.k, r.lam)


def audit(
    per_user: dict[str, np.ndarray],
    top_items: np.ndarray,
    context: AuditContext,
    config: AuditConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The audit of one model: ``per_user`` metrics and ``top_items`` lists for every user."""
    top_k = top_items[:, : config.k]
    groups: dict[str, Any] = {}
    for attribute, labels in context.groups.items():
        gaps = {
            metric: m.group_gap(
                per_user[metric],
                labels,
                rng,
                config.bootstrap_resamples,
                config.confidence,
                config.min_group_size,
            )
            for metric in config.metrics
        }
        if all(gap is not None for gap in gaps.values()):
            groups[attribute] = {metric: _gap_record(gap) for metric, gap in gaps.items() if gap}
    exposure = m.exposure_counts(top_k, context.split.num_items)
    seen = [context.split.history(u, context.stage)[0] for u in range(context.split.num_users)]
    items = {
        f"coverage@{config.k}": m.item_coverage(exposure),
        "gini": m.gini_index(exposure),
        "entropy": m.shannon_entropy(exposure),
        "arp": m.average_popularity(top_k, context.popularity),
        "aplt": m.average_long_tail_share(top_k, context.tail),
        "pop_rsp": m.popularity_rsp(top_k, context.tail, seen),
    }
    record: dict[str, Any] = {
        "k": config.k,
        "stage": context.stage,
        "groups": groups,
        "items": items,
    }
    if context.genres is not None:
        kl = np.array(
            [
                m.calibration_kl(history, top_k[u], context.genres, config.calibration_alpha)
                for u, history in enumerate(seen)
            ]
        )
        known = ~np.isnan(kl)
        record["calibration"] = {
            "kl": float(kl[known].mean()),
            "by_group": {
                attribute: {
                    g: float(kl[known & (labels == g)].mean())
                    for g in sorted(set(labels[known].tolist()) - {""})
                }
                for attribute, labels in context.groups.items()
            },
        }
    record["breaches"] = breaches(record, config)
    return record


def _gap_record(gap: m.GroupGap) -> dict[str, Any]:
    return {
        "means": gap.means,
        "counts": gap.counts,
        "gap": gap.gap,
        "ratio": gap.ratio,
        "ci": [gap.ci_low, gap.ci_high],
        "best": gap.best,
        "worst": gap.worst,
        "small": gap.small,
    }


def breaches(record: dict[str, Any], config: AuditConfig) -> list[str]:
    """Human-readable threshold breaches of one audit record (empty: none)."""
    found = []
    for attribute, by_metric in record["groups"].items():
        for metric, limit in config.max_gap.items():
            gap = by_metric.get(metric)
            if gap is not None and gap["ci"][0] > limit:
                found.append(
                    f"{metric} gap across {attribute} is {gap['gap']:.4f} "
                    f"({gap['best']} vs {gap['worst']}, {config.confidence:.0%} CI "
                    f"{gap['ci'][0]:.4f}–{gap['ci'][1]:.4f}) > max_gap {limit}"
                )
    items = record["items"]
    checks: tuple[tuple[float | None, float, str, str, str], ...] = (
        (config.min_coverage, items[f"coverage@{config.k}"], "coverage", "<", "min_coverage"),
        (config.max_gini, items["gini"], "Gini index", ">", "max_gini"),
        (config.min_aplt, items["aplt"], "APLT", "<", "min_aplt"),
        (
            config.max_calibration_kl,
            record.get("calibration", {}).get("kl", float("nan")),
            "calibration KL",
            ">",
            "max_calibration_kl",
        ),
    )
    for bound, value, name, op, option in checks:
        if bound is not None and (value < bound if op == "<" else value > bound):
            found.append(f"{name} {value:.4f} {op} {option} {bound}")
    return found


def audit_round(
    scorer: Scorer,
    context: AuditContext,
    config: AuditConfig,
    evaluation: EvalConfig,
    round_number: int,
    seed: int,
    evaluated: EvalResult | None = None,
) -> dict[str, Any]:
    """The server-side audit line of one round: evaluates the model on every user's held-out
    item (reusing ``evaluated``, an evaluation of the audited stage with top-K lists, when no
    re-ranking is asked) and audits it. Its bootstrap seed depends on the round only, so a
    resumed run audits exactly as an uninterrupted one."""
    started = time.perf_counter()
    if config.rerank is not None or evaluated is None or evaluated.top_items.shape[1] < config.k:
        evaluated = context.evaluate(scorer, config, evaluation)
    rng = np.random.default_rng([seed, round_number])
    record = audit(evaluated.per_user, evaluated.top_items, context, config, rng)
    return audit_line(record, config, round_number, time.perf_counter() - started, "server")


def audit_line(
    record: dict[str, Any], config: AuditConfig, round_number: int, seconds: float, mode: str
) -> dict[str, Any]:
    """What ``audit.jsonl`` holds for one round; breaches are logged as warnings."""
    for breach in record["breaches"]:
        log.warning("audit, round %d: %s", round_number, breach)
    rerank = dataclasses.asdict(config.rerank) if config.rerank is not None else None
    return {"round": round_number, "seconds": seconds, "mode": mode, "rerank": rerank, **record}
