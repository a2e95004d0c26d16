"""DP-SGD with the item table's per-example gradients kept as the rows each example touched.

Opacus materialises an embedding's per-example gradient densely, ``[B, V, D]`` for each of the
three lookups of a sequential recommender's tied item table (inputs, targets, negatives), and
its ghost clipping refuses a parameter used more than once. On ML-100K that is 9 of a 19 ms
HSTU step. An example reads at most ``2L + R`` rows, and the gradient of its loss with respect
to a lookup's output *is* its per-example gradient of the rows it read (its loss depends on
its own rows alone). No library keeps per-example gradients of a tied table this way, so it is
written here; everything else stays Opacus: per-example gradients of the other layers
(``GradSampleModule``), Poisson batches, the noise, the optimizer step.

``tests/test_dp_sgd.py`` checks the result against Opacus' dense path and against gradients
computed one example at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn


class RowSampledTable:
    """Records, for every lookup of ``embedding`` in a training forward pass, the ids read and
    the per-example gradient of the rows read (captured in the backward pass)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self._ids: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        self._coalesced: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._handle = embedding.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return None
        ids = inputs[0]
        batch = ids.shape[0]

        def capture(grad: torch.Tensor) -> None:
            self._ids.append(ids.reshape(batch, -1))
            # The loss is the batch mean (Opacus' "mean" reduction): undo the 1/B.
            self._grads.append(grad.reshape(batch, -1, grad.shape[-1]) * batch)

        # The rows read become the graph's leaf: autograd stops there instead of summing a
        # dense table gradient that the DP optimizer would replace anyway.
        rows = output.detach().requires_grad_(True)
        rows.register_hook(capture)
        return rows

    def clear(self) -> None:
        self._ids, self._grads, self._coalesced = [], [], None

    def remove(self) -> None:
        self._handle.remove()
        self.clear()

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(example, row, gradient, batch)``: one gradient per distinct (example, row)."""
        if self._coalesced is None:
            if not self._ids:
                empty = torch.zeros(0, dtype=torch.long, device=self.weight.device)
                self._coalesced = (empty, empty, self.weight.new_zeros(0, self.weight.shape[1]), 0)
                return self._coalesced
            ids = torch.cat(self._ids, dim=1)
            grads = torch.cat(self._grads, dim=1)
            if self.padding_idx is not None:  # nn.Embedding never updates the padding row
                grads = grads * (ids != self.padding_idx).unsqueeze(-1)
            batch, rows = ids.shape[0], self.weight.shape[0]
            examples = torch.arange(batch, device=ids.device).unsqueeze(1)
            keys, inverse = torch.unique((examples * rows + ids).reshape(-1), return_inverse=True)
            summed = grads.new_zeros(len(keys), grads.shape[-1])
            summed.index_add_(0, inverse, grads.reshape(-1, grads.shape[-1]))
            self._coalesced = (keys // rows, keys % rows, summed, batch)
        return self._coalesced

    def squared_norms(self) -> torch.Tensor:
        """``[B]``: each example's squared gradient norm over the whole table."""
        example, _, summed, batch = self._rows()
        return summed.new_zeros(batch).index_add_(0, example, summed.pow(2).sum(dim=1))

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``Σ_b factors[b] · grad_b`` as a dense table gradient."""
        example, row, summed, _ = self._rows()
        scaled = summed * factors.to(summed.dtype)[example].unsqueeze(1)
        return torch.zeros_like(self.weight).index_add_(0, row, scaled)


class RowSparseDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (flat clipping, noise, step hooks) whose clipping also covers
    the ``tables``: one norm per example over every parameter, as Opacus computes it."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, tables: list[RowSampledTable], **kwargs: Any
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self.tables = {id(table.weight): table for table in tables}

    def _dense(self) -> list[nn.Parameter]:
        return [p for p in self.params if id(p) not in self.tables]

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in self._dense()]

    @property
    def accumulated_iterations(self) -> int:
        # The tables hold one batch; the dense parameters must agree (Opacus' own check).
        dense = self._dense()
        if any(isinstance(p.grad_sample, list) for p in dense):  # type: ignore[attr-defined]
            raise ValueError("row-sparse DP-SGD takes one backward pass per step")
        return 1

    def clip_and_accumulate(self) -> None:
        samples = {id(p): self._get_flat_grad_sample(p) for p in self._dense()}
        parts = [g.flatten(1).norm(2, dim=1) for g in samples.values()]
        parts += [table.squared_norms().sqrt() for table in self.tables.values()]
        norms = torch.stack(parts, dim=1).norm(2, dim=1)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            table = self.tables.get(id(p))
            if table is None:
                _check_processed_flag(p.grad_sample)
                sample = samples[id(p)].to(p.dtype)
                grad = (factors.to(p.dtype) @ sample.flatten(1)).view_as(p)
                _mark_as_processed(p.grad_sample)
            else:
                grad = table.clipped_sum(factors)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        for table in self.tables.values():
            table.clear()


@contextmanager
def hidden_from_opacus(embeddings: list[nn.Embedding]) -> Iterator[None]:
    """Freeze ``embeddings`` while Opacus wraps a model, so it adds no per-example hooks to
    them (a ``RowSampledTable`` takes their place)."""
    flags = [e.weight.requires_grad for e in embeddings]
    for embedding in embeddings:
        embedding.weight.requires_grad_(False)
    try:
        yield
    finally:
        for embedding, flag in zip(embeddings, flags, strict=True):
            embedding.weight.requires_grad_(flag)
