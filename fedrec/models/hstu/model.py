"""HSTU as in "Actions Speak Louder than Words" (Zhai et al., ICML 2024), plain PyTorch.

Per layer: ``U, V, Q, K = split(SiLU(f1(LayerNorm(X))))``;
``A = SiLU(Q Kᵀ + rab) / n`` under a causal mask (pointwise, no softmax; ``n`` is the
configured ``max_len``, the padded length of the reference implementation, so outputs do not
depend on how much padding a batch carries);
``Y = X + f2(Norm(A V) ⊙ U)``. The relative attention bias adds a learned weight per
relative position and per log-bucketed time gap.

One deliberate difference from the reference repository: the time gap of query i and key j is
``t_i - t_j`` (the query's own time), not the time of the *next* action, so no information
about the target leaks into the representation of the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.models.base import SequentialModelConfig, SequentialRecommender, attention_mask
from fedrec.models.registry import register_model


@dataclass
class HSTUConfig(SequentialModelConfig):
    """``attention_dim``/``linear_dim``: per-head sizes of Q,K and of U,V (0 = embedding_dim).

    ``num_time_buckets``: buckets of ``floor(ln(max(|Δt|, 1)) / 0.301)``, clamped.
    """

    attention_dim: int = 0
    linear_dim: int = 0
    num_time_buckets: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_dim < 0 or self.linear_dim < 0 or self.num_time_buckets < 1:
            raise ValueError(
                "hstu: attention_dim and linear_dim must be >= 0, num_time_buckets >= 1"
            )
        self.attention_dim = self.attention_dim or self.embedding_dim
        self.linear_dim = self.linear_dim or self.embedding_dim


def time_buckets(timestamps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``[B, L, L]`` bucket of ``|t_i - t_j|`` on a log scale (as the HSTU repository buckets)."""
    # Out of place: torch.func.vmap (fedrec.federation.vectorised) has no batching rule for
    # in-place clamp_ and falls back to a slow per-example loop.
    gaps = (timestamps.unsqueeze(2) - timestamps.unsqueeze(1)).abs().clamp(min=1).float()
    return (gaps.log() / 0.301).long().clamp(0, num_buckets)


class RelativeBucketedBias(nn.Module):
    """``rab[b, i, j] = w_pos[j - i] + w_time[bucket_b(t_i - t_j)]``.

    The tables are indexed directly rather than through ``nn.Embedding``: its backward over
    ``B·L²`` indices was 3× slower on CPU. Per-sample gradient engines treat this module
    through their generic (functorch) path.
    """

    def __init__(self, max_len: int, num_buckets: int):
        super().__init__()
        self.max_len = max_len
        self.position_weights = nn.Parameter(torch.empty(2 * max_len - 1))
        self.time_weights = nn.Parameter(torch.empty(num_buckets + 1))
        nn.init.trunc_normal_(self.position_weights, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.time_weights, std=0.02, a=-0.04, b=0.04)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """``buckets`` ``[B, Q, L]``: the rows of the last ``Q`` of ``L`` queries (all of them,
        or the last alone); the bias has the same shape."""
        queries, length = buckets.shape[-2:]
        steps = torch.arange(length, device=buckets.device)
        relative = steps[None, :] - steps[length - queries :, None] + self.max_len - 1
        return self.position_weights[relative] + self.time_weights[buckets]


class HSTULayer(nn.Module):
    def __init__(self, config: HSTUConfig):
        super().__init__()
        self.heads = config.num_heads
        self.max_len = config.max_len
        self.attention_dim = config.attention_dim
        self.linear_dim = config.linear_dim
        dim = config.embedding_dim
        self.uvqk = nn.Linear(
            dim, self.heads * (2 * self.linear_dim + 2 * self.attention_dim), bias=False
        )
        self.output = nn.Linear(self.heads * self.linear_dim, dim)
        # The reference implementation's initialisation.
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.output.weight)
        self.relative_bias = RelativeBucketedBias(config.max_len, config.num_time_buckets)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """``[B, L, D]``; ``last_only``: the last position's output alone, ``[B, 1, D]`` (its
        keys and values still read every position; the other queries are not computed)."""
        batch, length, dim = x.shape
        projected = F.silu(self.uvqk(F.layer_norm(x, (dim,), eps=1e-6)))
        hl, ha = self.heads * self.linear_dim, self.heads * self.attention_dim
        u, v, q, k = torch.split(projected, [hl, hl, ha, ha], dim=-1)
        if last_only:
            x, u, q, mask = x[:, -1:], u[:, -1:], q[:, -1:], mask[:, -1:]
        queries = q.shape[1]
        q = q.view(batch, queries, self.heads, self.attention_dim)
        k = k.view(batch, length, self.heads, self.attention_dim)
        v = v.view(batch, length, self.heads, self.linear_dim)
        bias = self.relative_bias(buckets[:, -1:] if last_only else buckets).unsqueeze(1)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) + bias
        weights = F.silu(scores) / self.max_len * mask.unsqueeze(1)
        attended = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, queries, hl)
        gated = F.layer_norm(attended, (hl,), eps=1e-6) * u
        return x + self.output(self.dropout(gated))


@register_model("hstu")
class HSTU(SequentialRecommender):
    config_class = HSTUConfig

    def __init__(self, config: HSTUConfig, num_items: int):
        super().__init__(config, num_items)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))
        self.num_time_buckets = config.num_time_buckets

    def encode(
        self, items: torch.Tensor, timestamps: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """``[B, L, D]``; ``last_only``: ``[B, 1, D]``, the last position, whose last layer
        computes that one query (the inference path of ``user_vectors``; tested equal)."""
        mask = attention_mask(items).to(self.item_embedding.weight.dtype)
        x = self.embed_inputs(items)
        keep = (items > 0).unsqueeze(-1)
        buckets = time_buckets(timestamps, self.num_time_buckets)
        for index, layer in enumerate(self.layers):
            final = last_only and index == len(self.layers) - 1
            x = layer(x, buckets, mask, final) * (keep[:, -1:] if final else keep)
        return x

    def encode_last(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        return self.encode(items, timestamps, last_only=True)[:, -1]
