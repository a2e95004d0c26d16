"""A multi-task ranker: DCN-v2 cross layers under an MMoE trunk (issue 18).

- DCN-v2 (Wang et al., WWW 2021): ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``, full-rank ``W_l``
  or, with ``cross_rank`` > 0, the paper's low-rank ``U_l (V_lᵀ x_l)``.
- MMoE (Ma et al., KDD 2018): ``experts`` ReLU MLPs shared by all tasks; task ``t`` mixes them
  with its own softmax gate over the cross network's output and reads its logit off a tower.

Features of one (user, candidate) pair, all public to the device that ranks: the user's
attributes (they stay on the device), the item's genres, year bucket and semantic-ID codes, the
user's vector from the sequential model, the candidate's retrieval source and score, and the
item's log popularity. The loss is per example (``per_example_loss``), so DP-SGD (Opacus) and
user-level DP apply as to the other models. ``reference_logits`` recomputes the logits one
example at a time from the equations above; tests hold the batched path to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("like", "engage")


@dataclass
class RankerConfig:
    """``categorical_sizes``: values of each categorical field (user attributes, year bucket,
    retrieval source), each embedded in ``embedding_dim``; ``genres``: width of the genre
    multi-hot; ``code_sizes``: codebook size of each semantic-ID level; ``user_dim``: width of
    the sequential model's user vector; ``dense``: other numeric features (retrieval score, log
    popularity)."""

    categorical_sizes: tuple[int, ...] = ()
    genres: int = 0
    code_sizes: tuple[int, ...] = ()
    user_dim: int = 0
    dense: int = 0
    tasks: tuple[str, ...] = TASKS
    embedding_dim: int = 16
    cross_layers: int = 2
    cross_rank: int = 0
    experts: int = 4
    expert_dim: int = 64
    tower_dim: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.categorical_sizes = tuple(int(s) for s in self.categorical_sizes)
        self.code_sizes = tuple(int(s) for s in self.code_sizes)
        self.tasks = tuple(self.tasks)
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ranker.tasks: distinct names among {TASKS}, got {self.tasks}")
        if any(s < 1 for s in (*self.categorical_sizes, *self.code_sizes)):
            raise ValueError("ranker: every categorical field and codebook needs >= 1 value")
        if min(self.genres, self.user_dim, self.dense, self.cross_layers, self.cross_rank) < 0:
            raise ValueError("ranker: genres, user_dim, dense, cross_layers, cross_rank >= 0")
        if min(self.embedding_dim, self.experts, self.expert_dim, self.tower_dim) < 1:
            raise ValueError("ranker: embedding_dim, experts, expert_dim, tower_dim >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("ranker.dropout must lie in [0, 1)")
        if self.input_dim == 0:
            raise ValueError("ranker: no features (every feature width is 0)")

    @property
    def input_dim(self) -> int:
        """Width of ``x_0``: one embedding per categorical field, one for the genres, one for
        the codes, then the user vector and the dense features as they are."""
        embedded = len(self.categorical_sizes) + bool(self.genres) + bool(self.code_sizes)
        return embedded * self.embedding_dim + self.user_dim + self.dense


class RankingBatch(NamedTuple):
    """Features of ``B`` (user, candidate) pairs; a field a config does not use has width 0."""

    categorical: torch.Tensor  # [B, fields] long, value of each field
    genres: torch.Tensor  # [B, genres] float multi-hot
    codes: torch.Tensor  # [B, levels] long, the item's semantic-ID code
    user: torch.Tensor  # [B, user_dim] float
    dense: torch.Tensor  # [B, dense] float


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer; ``rank`` > 0: ``W_l = U_l V_lᵀ``."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.linears = nn.ModuleList(
            [nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim)]
            if rank
            else [nn.Linear(dim, dim)]
        )

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixed = x
        for linear in self.linears:
            mixed = linear(mixed)
        return x0 * mixed + x

    def matrix(self) -> torch.Tensor:
        """``W_l`` as one matrix, and (``offset``) its bias ``b_l``."""
        weights = [cast(nn.Linear, linear).weight for linear in self.linears]
        return weights[-1] @ weights[0] if len(weights) == 2 else weights[0]

    def offset(self) -> torch.Tensor:
        return cast(nn.Linear, self.linears[-1]).bias


class MultiTaskRanker(nn.Module):
    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        dim, emb = config.input_dim, config.embedding_dim
        # A feature group the config does not use has no parameters: a parameter no example
        # reaches would have no per-sample gradient, and Opacus refuses to clip it.
        sizes, codes = config.categorical_sizes, config.code_sizes
        self.offsets = torch.tensor([0, *sizes]).cumsum(0)[:-1]
        self.categorical = nn.Embedding(sum(sizes), emb) if sizes else None
        self.genre_projection = nn.Linear(config.genres, emb) if config.genres else None
        self.code_offsets = torch.tensor([0, *codes]).cumsum(0)[:-1]
        self.codes = nn.Embedding(sum(codes), emb) if codes else None
        self.cross = nn.ModuleList(
            CrossLayer(dim, config.cross_rank) for _ in range(config.cross_layers)
        )
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, config.expert_dim), nn.ReLU(), nn.Dropout(config.dropout))
            for _ in range(config.experts)
        )
        self.gates = nn.ModuleList(nn.Linear(dim, config.experts) for _ in config.tasks)
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(config.expert_dim, config.tower_dim),
                nn.ReLU(),
                nn.Linear(config.tower_dim, 1),
            )
            for _ in config.tasks
        )

    def inputs(self, batch: RankingBatch) -> torch.Tensor:
        """``x_0`` ``[B, input_dim]``. Lookups are batch-shaped, so Opacus attributes them
        per example."""
        parts = []
        if self.categorical is not None:
            index = batch.categorical + self.offsets.to(batch.categorical.device)
            parts.append(self.categorical(index).flatten(1))
        if self.genre_projection is not None:
            parts.append(self.genre_projection(batch.genres))
        if self.codes is not None:
            parts.append(self.codes(batch.codes + self.code_offsets.to(batch.codes.device)).sum(1))
        return torch.cat([*parts, batch.user, batch.dense], dim=1)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """One logit per task, ``[B, tasks]``."""
        x0 = self.inputs(batch)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = gate(x).softmax(dim=-1).unsqueeze(-1)  # [B, E, 1]
            logits.append(tower((weights * experts).sum(dim=1)))
        return torch.cat(logits, dim=1)

    def per_example_loss(self, batch: RankingBatch, labels: torch.Tensor) -> torch.Tensor:
        """Sum over tasks of the binary cross-entropy of each pair, ``[B]``; ``labels`` is
        ``[B, tasks]`` of 0/1."""
        logits = self(batch)
        return F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none"
        ).sum(dim=1)

    @torch.no_grad()
    def reference_logits(self, batch: RankingBatch) -> torch.Tensor:
        """The logits one pair at a time, from the module docstring's equations with explicit
        sums over the raw weights (the oracle of ``forward``: no submodule is called)."""

        def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            assert isinstance(layer, nn.Linear)
            w, b = layer.weight, layer.bias
            return torch.stack(
                [sum(w[i, j] * x[j] for j in range(len(x))) + b[i] for i in range(len(w))]
            )

        rows = []
        for b in range(len(batch.user)):
            parts: list[torch.Tensor] = []
            if self.categorical is not None:
                start = 0
                for field, size in enumerate(self.config.categorical_sizes):
                    parts.append(self.categorical.weight[start + batch.categorical[b, field]])
                    start += size
            if self.genre_projection is not None:
                parts.append(linear(self.genre_projection, batch.genres[b]))
            if self.codes is not None:
                start, code = 0, torch.zeros(self.config.embedding_dim)
                for level, size in enumerate(self.config.code_sizes):
                    code = code + self.codes.weight[start + batch.codes[b, level]]
                    start += size
                parts.append(code)
            x0 = torch.cat([*parts, batch.user[b], batch.dense[b]])
            x = x0
            for layer in self.cross:
                assert isinstance(layer, CrossLayer)
                w, bias = layer.matrix(), layer.offset()
                x = torch.stack(
                    [
                        x0[i] * (sum(w[i, j] * x[j] for j in range(len(x))) + bias[i]) + x[i]
                        for i in range(len(x))
                    ]
                )
            outputs = [linear(cast(nn.Sequential, e)[0], x).clamp(min=0) for e in self.experts]
            row = []
            for gate, tower in zip(self.gates, self.towers, strict=True):
                scores = linear(gate, x)
                weights = scores.exp() / scores.exp().sum()
                mixed = sum(weights[e] * outputs[e] for e in range(len(outputs)))
                assert isinstance(mixed, torch.Tensor)
                layers = cast(nn.Sequential, tower)
                row.append(linear(layers[2], linear(layers[0], mixed).clamp(min=0))[0])
            rows.append(torch.stack(row))
        return torch.stack(rows)
