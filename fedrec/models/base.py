"""What every sequential recommender shares: embeddings, scoring and the training loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("sampled_softmax", "full_softmax")


@dataclass
class SequentialModelConfig:
    """Defaults follow the HSTU repository's ML-1M configs.

    ``loss``: ``sampled_softmax`` draws ``num_negatives`` uniform negatives per sequence (shared
    by its positions; accidental hits are masked) or ``full_softmax`` over all items.
    ``l2_normalize``: cosine scoring of user and item vectors, divided by ``temperature``.
    """

    max_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    loss: str = "sampled_softmax"
    num_negatives: int = 128
    temperature: float = 0.05
    l2_normalize: bool = True

    def __post_init__(self) -> None:
        checks = {
            "max_len": self.max_len >= 1,
            "embedding_dim": self.embedding_dim >= 1,
            "num_blocks": self.num_blocks >= 0,
            "num_heads": self.num_heads >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "num_negatives": self.num_negatives >= 1,
            "temperature": self.temperature > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid model option(s) {bad}: {[getattr(self, b) for b in bad]}")
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {self.loss!r}")


class SequentialRecommender(nn.Module):
    """Base class: ``encode`` maps left-padded item ids (0 = padding) to one vector per position."""

    config_class: type[SequentialModelConfig] = SequentialModelConfig

    def __init__(self, config: SequentialModelConfig, num_items: int):
        super().__init__()
        self.config = config
        self.num_items = num_items
        dim = config.embedding_dim
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, dim)
        self.input_dropout = nn.Dropout(config.dropout)
        # As the HSTU reference: truncated N(0, 0.02) items, Xavier-normal positions.
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.xavier_normal_(self.position_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def embed_inputs(self, items: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds model max_len {self.config.max_len}"
            )
        positions = torch.arange(
            self.config.max_len - length, self.config.max_len, device=items.device
        )
        x = self.item_embedding(items) * math.sqrt(self.config.embedding_dim)
        # Batch-shaped lookup, so per-sample gradient engines (Opacus) attribute it per example.
        x = x + self.position_embedding(positions.expand(items.shape[0], -1))
        return self.input_dropout(x) * (items > 0).unsqueeze(-1)

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=-1, eps=1e-6) if self.config.l2_normalize else vectors

    def item_vectors(self) -> torch.Tensor:
        """Scoring vectors of items ``0..num_items-1`` (embedding rows ``1..num_items``)."""
        return self._normalize(self.item_embedding.weight[1:])

    def encode_last(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: ``encode``'s last position (a model may skip computing the others)."""
        return self.encode(items, timestamps)[:, -1]

    def user_vectors(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """The vector that scores the next item after each (left-padded) history."""
        return self._normalize(self.encode_last(items, timestamps))

    def score_all(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """Scores over all items for the next position after each (left-padded) history."""
        return self.user_vectors(items, timestamps) @ self.item_vectors().T

    def position_losses(
        self,
        items: torch.Tensor,
        timestamps: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item cross-entropy at every position: ``(losses [B, L], valid [B, L])``.

        Padding positions (target 0) get loss 0. Keeping the loss per position lets a caller
        reduce per sequence (DP-SGD needs a per-example loss) or over all positions.
        ``negatives`` ``[B, num_negatives]`` (sampled softmax): drawn here from torch's global
        generator when not given.
        """
        valid = targets > 0
        if self.config.loss == "full_softmax":
            hidden = self._normalize(self.encode(items, timestamps)[valid])
            logits = hidden @ self.item_vectors().T / self.config.temperature
            picked = F.cross_entropy(logits, targets[valid] - 1, reduction="none")
            losses = torch.zeros(valid.shape, dtype=picked.dtype, device=picked.device)
            losses[valid] = picked
            return losses, valid
        hidden = self._normalize(self.encode(items, timestamps))
        # Negatives are drawn per sequence: wider catalogue coverage per step than one shared
        # set, and each example's loss still depends on that example alone (DP-SGD needs this).
        if negatives is None:
            negatives = self.draw_negatives(items.shape[0], items.device)
        pos_vectors = self._normalize(self.item_embedding(targets))
        neg_vectors = self._normalize(self.item_embedding(negatives))
        pos_logits = (hidden * pos_vectors).sum(-1, keepdim=True)
        neg_logits = torch.einsum("bld,brd->blr", hidden, neg_vectors).masked_fill(
            negatives[:, None, :] == targets[:, :, None], -torch.inf
        )
        logits = torch.cat([pos_logits, neg_logits], dim=-1) / self.config.temperature
        losses = torch.where(valid, -F.log_softmax(logits, dim=-1)[..., 0], 0.0)
        return losses, valid

    def draw_negatives(
        self, rows: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[rows, num_negatives]`` uniform item ids, as ``position_losses`` draws them."""
        shape = (rows, self.config.num_negatives)
        return torch.randint(1, self.num_items + 1, shape, device=device, generator=generator)

    def loss(
        self, items: torch.Tensor, timestamps: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-item loss over all non-padding positions of the batch."""
        losses, valid = self.position_losses(items, timestamps, targets)
        return losses.sum() / valid.sum().clamp(min=1)


def attention_mask(items: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]`` bool: query i may attend key j iff j <= i and j is an item (or j == i).

    Allowing the diagonal keeps padded query rows from being fully masked (no NaN); their
    outputs are never used.
    """
    length = items.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    keys = (items > 0).unsqueeze(1)
    diagonal = torch.eye(length, dtype=torch.bool, device=items.device)
    return causal & (keys | diagonal)
