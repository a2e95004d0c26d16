"""Full-ranking evaluation over all items (no sampled negatives)."""

from fedrec.evaluation.evaluator import (
    EvalConfig,
    EvalResult,
    evaluate,
    evaluation_users,
    metric_names,
    popularity_scorer,
)
from fedrec.evaluation.metrics import rank_metrics, target_ranks

__all__ = [
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "evaluation_users",
    "metric_names",
    "popularity_scorer",
    "rank_metrics",
    "target_ranks",
]
