"""Multi-task rankers of the recommendation funnel, registered by name (``ranker_class``)."""

from fedrec.models.ranking.model import (
    TASKS,
    CrossLayer,
    MultiTaskRanker,
    RankerConfig,
    RankingBatch,
)

RANKERS = {"mmoe-dcn": MultiTaskRanker}


def ranker_class(name: str) -> type[MultiTaskRanker]:
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; registered: {sorted(RANKERS)}")
    return RANKERS[name]


__all__ = [
    "RANKERS",
    "TASKS",
    "CrossLayer",
    "MultiTaskRanker",
    "RankerConfig",
    "RankingBatch",
    "ranker_class",
]
