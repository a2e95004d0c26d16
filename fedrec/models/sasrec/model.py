"""SASRec (Kang & McAuley, ICDM 2018) with pre-norm transformer blocks, plain PyTorch.

Attention is written with ``nn.Linear`` projections rather than ``nn.MultiheadAttention`` so
that the same module runs under Opacus' per-sample gradient hooks without replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.models.base import SequentialModelConfig, SequentialRecommender, attention_mask
from fedrec.models.registry import register_model


@dataclass
class SASRecConfig(SequentialModelConfig):
    """``ffn_dim``: hidden size of the point-wise feed-forward layer (0 = embedding_dim)."""

    ffn_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"sasrec: embedding_dim {self.embedding_dim} must divide by num_heads {self.num_heads}"
            )
        if self.ffn_dim < 0:
            raise ValueError("sasrec.ffn_dim must be >= 0")
        self.ffn_dim = self.ffn_dim or self.embedding_dim


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        dim = config.embedding_dim
        self.heads = config.num_heads
        self.attention_norm = nn.LayerNorm(dim, eps=1e-8)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_dim, dim),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.attention_dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(dim, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask.unsqueeze(1),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        x = x + self.dropout(
            self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim))
        )
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


@register_model("sasrec")
class SASRec(SequentialRecommender):
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig, num_items: int):
        super().__init__(config, num_items)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.embedding_dim, eps=1e-8)

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(items)
        x = self.embed_inputs(items)
        keep = (items > 0).unsqueeze(-1)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.final_norm(x)
