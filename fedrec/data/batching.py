"""Turn users' sequences into left-padded tensors for sequential models.

Item ids are shifted by one so that 0 is padding; sequences are right-aligned, so the last
real item always sits at position ``max_len - 1``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.data.split import SequenceSplit, Stage


def _gather_tail(
    split: SequenceSplit, starts: np.ndarray, ends: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ``[B, max_len]`` windows ``items[max(start, end - max_len):end]`` (+1), 0-padded."""
    starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    columns = np.arange(max_len)[None, :]
    source = ends[:, None] - max_len + columns
    valid = columns >= (max_len - lengths)[:, None]
    source = np.where(valid, source, 0)
    items = np.where(valid, split.items[source] + 1, 0)
    times = np.where(valid, split.timestamps[source], 0.0)
    return items, times


def history_batch(
    split: SequenceSplit, users: np.ndarray, stage: Stage, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``max_len`` items a model may see before ``stage``'s target, and their times."""
    starts = split.offsets[users]
    ends = split.offsets[users + 1] - (2 if stage == "valid" else 1)
    items, times = _gather_tail(split, starts, ends, max_len)
    return torch.from_numpy(items), torch.from_numpy(times.astype(np.int64))


def next_item_batch(
    split: SequenceSplit, users: np.ndarray, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``max_len`` items of each user's whole history and their times: the input that
    scores the item after them (a recommendation)."""
    items, times = _gather_tail(split, split.offsets[users], split.offsets[users + 1], max_len)
    return torch.from_numpy(items), torch.from_numpy(times.astype(np.int64))


def training_batch(
    split: SequenceSplit, users: np.ndarray, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Autoregressive inputs and next-item targets over every position of the training history.

    Input position t holds item t of the window and is trained to predict item t+1; padding
    targets are 0 and must be ignored by the loss.
    """
    starts = split.offsets[users]
    train_end = split.offsets[users + 1] - 2
    items, times = _gather_tail(split, starts, train_end, max_len + 1)
    inputs = items[:, :-1]
    targets = np.where(inputs > 0, items[:, 1:], 0)
    return (
        torch.from_numpy(inputs),
        torch.from_numpy(times[:, :-1].astype(np.int64)),
        torch.from_numpy(targets),
    )


def history_mask_indices(
    split: SequenceSplit, users: np.ndarray, stage: Stage | None
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every item in each user's visible history, for masking scores;
    ``stage`` None: the whole sequence (a split of visible histories)."""
    starts = split.offsets[users]
    ends = split.offsets[users + 1] - {None: 0, "valid": 2, "test": 1}[stage]
    lengths = ends - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    positions = (
        np.arange(lengths.sum())
        - np.repeat(np.cumsum(lengths) - lengths, lengths)
        + np.repeat(starts, lengths)
    )
    return rows, split.items[positions]
