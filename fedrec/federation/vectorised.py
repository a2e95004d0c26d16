"""FedSGD for a shard of clients in one batched computation (cohort nodes).

A FedSGD client (one local SGD step at the global weights on its own sequence) sends
``global - lr * grad(loss_u)``. For a shard of one-user clients those gradients are per-example
gradients with the user as the example, so ``torch.func.vmap`` over ``grad_and_value`` of one
user's loss computes them chunk by chunk: the same model code, at the same weights, on the same
inputs. Each client's sampled-softmax negatives are drawn from a generator seeded with that
client's seed, as its own round would draw them from torch's seeded global generator, so with
dropout 0 the shard's states equal the per-client loop's (``tests/test_vectorised.py``). With
dropout > 0 the masks come from vmap's stream: the same distribution, other values.

Hand-written because neither Opacus nor Flower computes per-client model updates for a shard:
Opacus' per-sample gradients serve one optimizer step over a batch, not one update per user.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedrec.data.batching import training_batch
from fedrec.data.split import SequenceSplit
from fedrec.federation.config import FederatedConfig
from fedrec.federation.model import (
    FederatedModel,
    LocalResult,
    SequentialFederatedModel,
    training_positions,
)
from fedrec.models.base import SequentialRecommender
from fedrec.training import trainable_users

DEFAULT_CHUNK = 64  # users per batched pass: ≈ the fastest on 2 cores (BENCHMARKS.md)


ShardResult = list[tuple[dict[str, torch.Tensor], LocalResult]]


@runtime_checkable
class ShardTrainable(Protocol):
    """A ``FederatedModel`` (other than the sequential ones, which this module batches itself)
    that computes a shard's FedSGD steps in one batched computation."""

    def why_not_fedsgd_shard(self) -> str | None:
        """Why this model's clients cannot, or None if they can."""

    def fedsgd_shard(
        self, splits: Sequence[SequenceSplit], fed: FederatedConfig, seeds: Sequence[int]
    ) -> ShardResult | None:
        """As ``fedsgd_shard`` below: each client's state after its FedSGD step and its
        ``LocalResult``; None when some client's step is not one example's gradient."""


def why_not_vectorised(model: FederatedModel, fed: FederatedConfig) -> str | None:
    """Why ``fed``'s clients cannot train as one batched FedSGD computation, or None if they
    can."""
    if fed.partitioning != "user":
        return "a client holds several users (partitioning other than user)"
    if fed.record_dp is not None:
        return "record-level DP-SGD runs one Opacus engine per client"
    if fed.local_epochs != 1 or fed.local_optimizer != "sgd":
        return "local training is more than one SGD step (local_epochs 1, local_optimizer sgd)"
    if isinstance(model, ShardTrainable):
        return model.why_not_fedsgd_shard()
    if not isinstance(model, SequentialFederatedModel):
        return f"{type(model).__name__} has no batched FedSGD step"
    if model.model.config.loss != "sampled_softmax":
        return "full_softmax selects valid positions by boolean indexing, which vmap cannot batch"
    return None


def batched_fedsgd_steps(
    model: FederatedModel,
    splits: Sequence[SequenceSplit],
    fed: FederatedConfig,
    seeds: Sequence[int],
) -> ShardResult | None:
    """The batched FedSGD steps of a shard of clients, for a model ``why_not_vectorised``
    accepts: the sequential models' here, any other's its own."""
    if isinstance(model, ShardTrainable):
        return model.fedsgd_shard(splits, fed, seeds)
    assert isinstance(model, SequentialFederatedModel)
    return fedsgd_shard(model.model, splits, fed.local_learning_rate, seeds)


class _UserLoss(nn.Module):
    """One user's FedSGD loss as a module, so ``functional_call`` can run it at given weights."""

    def __init__(self, model: SequentialRecommender):
        super().__init__()
        self.model = model

    def forward(
        self,
        items: torch.Tensor,
        times: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor,
    ) -> torch.Tensor:
        losses, valid = self.model.position_losses(
            items[None], times[None], targets[None], negatives[None]
        )
        return losses.sum() / valid.sum().clamp(min=1)


def fedsgd_shard(
    model: SequentialRecommender,
    splits: Sequence[SequenceSplit],
    learning_rate: float,
    seeds: Sequence[int],
    chunk: int = DEFAULT_CHUNK,
) -> ShardResult | None:
    """Each client's state after one SGD step on its own sequence from ``model``'s weights
    (which are left as they are), and its ``LocalResult``; ``seeds[i]`` is client i's
    training seed (negatives, dropout). None when a client holds more than one trainable
    user (its step would batch several sequences: the per-client loop trains it)."""
    users = [trainable_users(split) for split in splits]
    if any(len(u) > 1 for u in users):
        return None
    global_state = {k: v.detach() for k, v in model.state_dict().items()}
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"model.{k}": v for k, v in model.named_buffers()}
    wrapped = _UserLoss(model)

    def user_loss(
        weights: dict[str, torch.Tensor],
        items: torch.Tensor,
        times: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor,
    ) -> torch.Tensor:
        return functional_call(wrapped, (weights, buffers), (items, times, targets, negatives))

    per_user = vmap(grad_and_value(user_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")
    training = [i for i, u in enumerate(users) if len(u)]
    results: dict[int, tuple[dict[str, torch.Tensor], LocalResult]] = {}
    model.train()
    for lo in range(0, len(training), chunk):
        part = training[lo : lo + chunk]
        rows = [training_batch(splits[i], users[i], model.config.max_len) for i in part]
        items, times, targets = (torch.cat(column) for column in zip(*rows, strict=True))
        negatives = torch.cat(
            [
                model.draw_negatives(1, items.device, torch.Generator().manual_seed(seeds[i]))
                for i in part
            ]
        )
        torch.manual_seed(seeds[part[0]])  # dropout's stream under vmap
        grads, losses = per_user(params, items, times, targets, negatives)
        for row, i in enumerate(part):
            state = dict(global_state)
            for name, g in grads.items():
                key = name.removeprefix("model.")
                state[key] = global_state[key] - learning_rate * g[row]
            positions = training_positions(splits[i], users[i])
            results[i] = (state, LocalResult(positions, float(losses[row]), None))
    return [
        results.get(i, (dict(global_state), LocalResult(0, math.nan, None)))
        for i in range(len(splits))
    ]
