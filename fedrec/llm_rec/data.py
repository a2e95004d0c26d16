"""Prompts of the LLM recommender: a user's history as semantic-ID tokens (optionally each item
followed by its title tokens), the scenario of a request, and training records."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedrec.data.records import record_spans
from fedrec.data.split import SequenceSplit, Stage
from fedrec.semantic_id.retrieval import CodeVocabulary

IGNORE = -100  # transformers' ignored label


class PromptBuilder:
    """Token ids of prompts and training records; ``titles`` holds each item's title token ids
    (empty: codes only)."""

    def __init__(
        self,
        vocabulary: CodeVocabulary,
        bos: int,
        pad: int,
        max_items: int,
        titles: list[list[int]] | None = None,
        scenario_rule: str = "none",
    ):
        self.vocabulary = vocabulary
        self.bos, self.pad = bos, pad
        self.max_items = max_items
        self.titles = titles
        self.scenario_rule = scenario_rule

    def item_tokens(self, item: int) -> tuple[list[int], list[int]]:
        """(tokens, labels) of one item: its code (predicted), then its title (read only)."""
        code = self.vocabulary.tokens[item].tolist()
        title = self.titles[item] if self.titles else []
        return code + title, code + [IGNORE] * len(title)

    def sequence(self, items: np.ndarray) -> tuple[list[int], list[int]]:
        tokens, labels = [self.bos], [IGNORE]
        for item in items.tolist():
            t, lab = self.item_tokens(int(item))
            tokens += t
            labels += lab
        return tokens, labels

    def prompt(self, history: np.ndarray) -> list[int]:
        return self.sequence(history[-self.max_items :])[0]

    def scenario(self, timestamps: np.ndarray) -> int:
        """Scenario id of a request from its history's timestamps (Unix seconds): ``weekend``
        tells Saturday/Sunday (UTC) of the last event from the other days."""
        if self.scenario_rule == "none" or not len(timestamps):
            return 0
        weekday = (int(timestamps[-1]) // 86400 + 3) % 7  # 1970-01-01 was a Thursday
        return int(weekday >= 5)

    def records(
        self,
        split: SequenceSplit,
        users: np.ndarray,
        window: int | None,
        period: int | None = 86400,
    ) -> TensorDataset:
        return self.tensors(self.record_rows(split, users, window, period))

    def record_rows(
        self,
        split: SequenceSplit,
        users: np.ndarray,
        window: int | None,
        period: int | None = 86400,
    ) -> list[tuple[list[int], list[int], int]]:
        """One record per calendar ``period`` of each user's training history, cut to its first
        ``window + 1`` events (``fedrec.data.records.record_spans``, for DP: removing one event
        changes one record); with ``period=None`` consecutive chunks of ``window + 1`` events
        (no DP: every event is used); with ``window=None`` one record per user (its latest
        ``max_items + 1`` events). ``records``: left-padded ``(input_ids, attention_mask, labels,
        scenario)``; ``record_rows``: the rows before padding (token ids, labels, scenario)."""
        rows: list[tuple[list[int], list[int], int]] = []
        for user in users.tolist():
            items, times = split.train_sequence(int(user))
            if window is None:
                spans = [(max(0, len(items) - self.max_items - 1), len(items))]
            elif period is None:
                spans = [
                    (a, min(a + window + 1, len(items))) for a in range(0, len(items), window + 1)
                ]
            else:
                spans = record_spans(times, window, period)
            for start, stop in spans:
                if stop - start < 2:
                    continue
                tokens, labels = self.sequence(items[start:stop][-(self.max_items + 1) :])
                rows.append((tokens, labels, self.scenario(times[start:stop][:-1])))
        return rows

    def tensors(self, rows: list[tuple[list[int], list[int], int]]) -> TensorDataset:
        width = max((len(r[0]) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (tokens, labs, _) in enumerate(rows):
            ids[i, width - len(tokens) :] = torch.tensor(tokens)
            mask[i, width - len(tokens) :] = 1
            labels[i, width - len(tokens) :] = torch.tensor(labs)
        scenarios = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return TensorDataset(ids, mask, labels, scenarios)

    def requests(self, split: SequenceSplit, users: np.ndarray, stage: Stage) -> TensorDataset:
        """Prompts (no labels) for the next item after each user's ``stage`` history."""
        rows = []
        for user in users.tolist():
            items, times = split.history(int(user), stage)
            tokens = self.prompt(items)
            rows.append((tokens, [IGNORE] * len(tokens), self.scenario(times)))
        return self.tensors(rows)
