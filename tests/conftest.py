"""Shared fixtures: small data sets built in memory, and the path of the shared MovieLens copy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.data import InteractionDataset, SyntheticConfig, generate_synthetic, leave_one_out
from fedrec.data.preprocess import PreprocessConfig, preprocess
from fedrec.data.split import SequenceSplit

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


def make_dataset(
    rows: list[tuple[int, int, float]], ratings: list[float] | None = None
) -> InteractionDataset:
    """A data set from (user, item, time) rows with dense raw ids."""
    users = np.array([r[0] for r in rows], dtype=np.int64)
    items = np.array([r[1] for r in rows], dtype=np.int64)
    return InteractionDataset(
        name="handmade",
        user_ids=users,
        item_ids=items,
        timestamps=np.array([r[2] for r in rows], dtype=np.float64),
        ratings=None if ratings is None else np.array(ratings, dtype=np.float32),
        raw_user_ids=np.array([f"u{u}" for u in range(users.max() + 1)], dtype=object),
        raw_item_ids=np.array([f"i{i}" for i in range(items.max() + 1)], dtype=object),
    )


@pytest.fixture(scope="session")
def small_split() -> SequenceSplit:
    config = SyntheticConfig(num_users=60, num_items=80, mean_length=15, max_length=40, seed=3)
    return leave_one_out(preprocess(generate_synthetic(config), PreprocessConfig()))


def reply(instruction, arrays, weight: int):
    """A client's train reply to ``instruction`` (a Flower Message) with ``arrays``."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": weight})})
    TaskIdentity.node_id = instruction.metadata.dst_node_id  # the reply's sender
    return Message(content, reply_to=instruction)


class FirstNodes:
    """The first ``n`` nodes of a grid are online (the enrolled devices of a test)."""

    def __init__(self, grid, n: int):
        self.grid, self.n = grid, n

    def get_node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())[: self.n]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self.grid.send_and_receive(messages, timeout=timeout)
