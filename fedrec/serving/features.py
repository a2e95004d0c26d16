"""The ranker's features of (user, candidate) pairs, from public tables only.

Item features come from the published catalogue (genres, year, popularity, semantic-ID codes);
the schema of the user attributes (their vocabularies) is public, the values are not: a device
or a request supplies its user's own. Every value outside a vocabulary is index 0, "unknown".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.audits.groups import age_band
from fedrec.data.catalogue import ItemCatalogue
from fedrec.models.ranking import RankerConfig, RankingBatch
from fedrec.serving.funnel import Candidates

# Release decades; index 0 is unknown, then one bucket per decade up to the 2020s.
YEAR_BUCKETS = ("", "<1930", *(f"{d}s" for d in range(1930, 2030, 10)))
# The audited user attributes, in this order; ages are banded as the audit bands them.
USER_ATTRIBUTES = ("age", "gender", "occupation")


def year_bucket(year: str) -> int:
    try:
        value = int(year)
    except ValueError:
        return 0
    return 1 if value < 1930 else min(2 + (value - 1930) // 10, len(YEAR_BUCKETS) - 1)


@dataclass(frozen=True)
class FeatureTables:
    """``vocabularies``: each user attribute's known values (index 0: unknown); ``genres``:
    [items, G] multi-hot; ``codes``: [items, levels]; ``log_popularity``: [items] in [0, 1]."""

    vocabularies: tuple[tuple[str, ...], ...]
    year: np.ndarray
    genres: np.ndarray
    codes: np.ndarray
    code_sizes: tuple[int, ...]
    log_popularity: np.ndarray

    @classmethod
    def build(
        cls, catalogue: ItemCatalogue, user_values: Mapping[str, Sequence[str]]
    ) -> FeatureTables:
        """``user_values``: each attribute's vocabulary (as the schema publishes it)."""
        features = catalogue.item_features
        years = features.get("year", ("",) * catalogue.num_items)
        names = sorted({g for row in features.get("genres", ()) for g in row.split()})
        genres = np.zeros((catalogue.num_items, len(names)), dtype=np.float32)
        for item, row in enumerate(features.get("genres", ())):
            genres[item, [names.index(g) for g in row.split()]] = 1.0
        codes = np.asarray(catalogue.codes or [()] * catalogue.num_items, dtype=np.int64)
        codes = codes.reshape(catalogue.num_items, -1)
        counts = popularity_counts(catalogue)
        return cls(
            vocabularies=tuple(
                ("", *sorted({_value(a, v) for v in user_values.get(a, ())} - {""}))
                for a in USER_ATTRIBUTES
            ),
            year=np.array([year_bucket(y) for y in years], dtype=np.int64),
            genres=genres,
            codes=codes,
            code_sizes=tuple(int(c) + 1 for c in codes.max(axis=0)) if codes.size else (),
            log_popularity=(np.log1p(counts) / max(np.log1p(counts.max()), 1.0)).astype(np.float32),
        )

    def attributes(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Each user's attribute indices, [users, attributes] (unknown values: 0)."""
        out = np.zeros((len(rows), len(USER_ATTRIBUTES)), dtype=np.int64)
        for r, row in enumerate(rows):
            for a, (name, vocabulary) in enumerate(
                zip(USER_ATTRIBUTES, self.vocabularies, strict=True)
            ):
                value = _value(name, str(row.get(name, "")))
                out[r, a] = vocabulary.index(value) if value in vocabulary else 0
        return out

    def ranker_config(self, user_dim: int, sources: int, **options: object) -> RankerConfig:
        return RankerConfig(
            categorical_sizes=(*map(len, self.vocabularies), len(YEAR_BUCKETS), sources),
            genres=self.genres.shape[1],
            code_sizes=self.code_sizes,
            user_dim=user_dim,
            dense=2 * sources + 1,
            **options,  # type: ignore[arg-type]
        )

    def batch(
        self, attributes: np.ndarray, user_vectors: torch.Tensor, candidates: Candidates
    ) -> RankingBatch:
        """The ``B × C`` pairs of ``candidates``, flattened row by row (pads as item 0)."""
        b, c = candidates.items.shape
        item = candidates.items.clip(0).reshape(-1)
        found = candidates.found.astype(np.float32)
        scores = candidates.scores.astype(np.float32)
        # Each source's scores, standardised over what it proposed to that user: sources
        # score on different scales (cosines, counts, beam log-probabilities).
        count = found.sum(axis=1, keepdims=True).clip(min=1)
        mean = (scores * found).sum(axis=1, keepdims=True) / count
        spread = np.sqrt((((scores - mean) * found) ** 2).sum(axis=1, keepdims=True) / count)
        standard = (scores - mean) / np.maximum(spread, 1e-6) * found
        dense = np.concatenate(
            [found, standard, self.log_popularity[item].reshape(b, c, 1)], axis=2
        )
        categorical = np.concatenate(
            [
                np.repeat(attributes, c, axis=0),
                self.year[item][:, None],
                candidates.source.clip(0).reshape(-1, 1),
            ],
            axis=1,
        )
        return RankingBatch(
            categorical=torch.from_numpy(categorical),
            genres=torch.from_numpy(self.genres[item]),
            codes=torch.from_numpy(self.codes[item]),
            user=user_vectors.float().repeat_interleave(c, dim=0),
            dense=torch.from_numpy(dense.reshape(b * c, -1)),
        )


def popularity_counts(catalogue: ItemCatalogue) -> np.ndarray:
    """The catalogue's published interaction counts (zeros when it publishes none)."""
    return np.asarray(catalogue.popularity or [0] * catalogue.num_items, dtype=np.float64)


def _value(attribute: str, value: str) -> str:
    return age_band(value) if attribute == "age" else value
