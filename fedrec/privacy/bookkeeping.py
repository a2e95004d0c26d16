"""Single-pass DP-SGD for sequential recommenders: per-example norms without per-example
gradients where those would be large.

Opacus materialises every layer's per-example gradient. For a sequential recommender's tied
item table that is ``[B, V, D]`` for each of its three lookups (inputs, targets, negatives),
9 of a 19 ms HSTU step on ML-100K; Opacus' ghost clipping avoids it but takes two backward
passes and refuses a parameter used more than once. Here, in one backward pass:

- **the item table** keeps each example's gradient as the rows it read: the gradient of the
  loss with respect to a lookup's output *is* the example's gradient of those rows (its loss
  depends on its own rows alone);
- **linear layers** keep their inputs ``a`` and output gradients ``g`` ("book-keeping", Bu et
  al. 2023): an example's weight-gradient norm is ``Σ_ts (a_t·a_s)(g_t·g_s)`` (or the
  materialised ``Σ_t g_t a_tᵀ`` when that is smaller), and the clipped sum is one matrix
  product of the clip-scaled ``g`` with ``a``;
- every other layer (positions, HSTU's relative bias, layer norms) stays with Opacus'
  per-example hooks.

The table's and linear layers' weights are frozen while training so that autograd does not also
build dense batch gradients the DP optimizer would discard. No library does this for tied
tables in one pass, so it is written here; Poisson batches, noise and the step stay Opacus'.
``tests/test_dp_sgd.py`` checks it against Opacus' dense path and against gradients computed
one example at a time.
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
        self.params = [embedding.weight]
        self.padding_idx = embedding.padding_idx
        self._ids: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        self._coalesced: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._handle = embedding.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        ids = inputs[0]
        batch = ids.shape[0]

        def capture(grad: torch.Tensor) -> None:
            self._ids.append(ids.reshape(batch, -1))
            self._grads.append(grad.reshape(batch, -1, grad.shape[-1]))

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
            batch, rows = ids.shape[0], self.weight.shape[0]
            examples = torch.arange(batch, device=ids.device).unsqueeze(1)
            keys, inverse = torch.unique((examples * rows + ids).reshape(-1), return_inverse=True)
            summed = grads.new_zeros(len(keys), grads.shape[-1])
            summed.index_add_(0, inverse, grads.reshape(-1, grads.shape[-1]))
            # The loss is the batch mean (Opacus' "mean" reduction): undo the 1/B.
            summed *= batch
            row = keys % rows
            if self.padding_idx is not None:  # nn.Embedding never updates the padding row
                summed[row == self.padding_idx] = 0.0
            self._coalesced = (keys // rows, row, summed, batch)
        return self._coalesced

    def squared_norms(self) -> torch.Tensor:
        """``[B]``: each example's squared gradient norm over the whole table."""
        example, _, summed, batch = self._rows()
        return summed.new_zeros(batch).index_add_(0, example, summed.pow(2).sum(dim=1))

    def clipped_sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """``[Σ_b factors[b] · grad_b]`` as a dense table gradient."""
        example, row, summed, _ = self._rows()
        scaled = summed * factors.to(summed.dtype)[example].unsqueeze(1)
        return [torch.zeros_like(self.weight).index_add_(0, row, scaled)]


Kept = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class LinearBook:
    """Keeps the inputs and output gradients of every training call of ``linear``."""

    def __init__(self, linear: nn.Linear) -> None:
        self.weight = linear.weight
        self.bias = linear.bias
        self.params = [p for p in (linear.weight, linear.bias) if p is not None]
        self._inputs: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        self._kept: Kept | None = None
        self._handles = [
            linear.register_forward_pre_hook(self._before),
            linear.register_forward_hook(self._after),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        # With the weight frozen, the output needs an input that requires grad to have a
        # gradient at all (a first layer fed data): make the input a leaf that does.
        if module.training and torch.is_grad_enabled() and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        inputs = args[0]
        batch = inputs.shape[0]

        def capture(grad: torch.Tensor) -> None:
            self._inputs.append(inputs.reshape(batch, -1, inputs.shape[-1]))
            self._grads.append(grad.reshape(batch, -1, grad.shape[-1]))

        output.register_hook(capture)

    def clear(self) -> None:
        self._inputs, self._grads, self._kept = [], [], None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()

    def _calls(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a [B, T, in]`` and ``g [B, T, out]``, every call of the step along ``T``."""
        if len(self._inputs) == 1:
            return self._inputs[0], self._grads[0]
        if not self._inputs:
            width = self.weight.shape
            return self.weight.new_zeros(0, 0, width[1]), self.weight.new_zeros(0, 0, width[0])
        return torch.cat(self._inputs, dim=1), torch.cat(self._grads, dim=1)

    def squared_norms(self) -> torch.Tensor:
        a, g = self._calls()
        steps, width_in, width_out = a.shape[1], a.shape[2], g.shape[2]
        per_example: torch.Tensor | None = None
        if steps * (width_in + width_out) < width_in * width_out:  # ghost norm is cheaper
            squared = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
        else:
            per_example = torch.einsum("bto,bti->boi", g, a)
            squared = per_example.flatten(1).pow(2).sum(dim=1)
        bias = g.sum(dim=1) if self.bias is not None else None
        if bias is not None:
            squared = squared + bias.pow(2).sum(dim=1)
        self._kept = (a, g, per_example, bias)
        # g is the gradient of the batch mean (Opacus' "mean" reduction): undo the 1/B.
        return squared * len(a) ** 2

    def clipped_sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        if self._kept is None:
            self.squared_norms()
        assert self._kept is not None
        a, g, per_example, bias = self._kept
        factors = factors.to(g.dtype) * len(a)  # undo the batch mean's 1/B
        if per_example is not None:
            sums = [torch.einsum("b,boi->oi", factors, per_example)]
        elif a.shape[-1] < g.shape[-1]:  # scale the narrower of the two
            sums = [g.flatten(0, 1).T @ (a * factors[:, None, None]).flatten(0, 1)]
        else:
            sums = [(g * factors[:, None, None]).flatten(0, 1).T @ a.flatten(0, 1)]
        if bias is not None:
            sums.append(factors @ bias)
        return sums


class BookkeepingDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (flat clipping, noise, step hooks) whose clipping also covers
    the parameters kept by ``books``: one norm per example over every parameter, as Opacus
    computes it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        books: list[RowSampledTable | LinearBook],
        **kwargs: Any,
    ) -> None:
        self.books = books
        self._booked = {id(p) for book in books for p in book.params}
        super().__init__(optimizer, **kwargs)

    @property
    def params(self) -> list[nn.Parameter]:
        # Opacus lists the parameters that require grad; the booked ones are frozen meanwhile.
        return [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad or id(p) in self._booked
        ]

    def _dense(self) -> list[nn.Parameter]:
        return [p for p in self.params if id(p) not in self._booked]

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in self._dense()]

    @property
    def accumulated_iterations(self) -> int:
        # The books hold one batch; the dense parameters must agree (Opacus' own check).
        if any(isinstance(p.grad_sample, list) for p in self._dense()):  # type: ignore[attr-defined]
            raise ValueError("book-keeping DP-SGD takes one backward pass per step")
        return 1

    def clip_and_accumulate(self) -> None:
        samples = {id(p): self._get_flat_grad_sample(p) for p in self._dense()}
        parts = [g.flatten(1).norm(2, dim=1) for g in samples.values()]
        parts += [book.squared_norms().sqrt() for book in self.books]
        norms = torch.stack(parts, dim=1).norm(2, dim=1)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        grads = {
            id(p): grad
            for book in self.books
            for p, grad in zip(book.params, book.clipped_sums(factors), strict=True)
        }
        for p in self.params:
            if id(p) in grads:
                grad = grads[id(p)]
            else:
                _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
                sample = samples[id(p)].to(p.dtype)
                grad = (factors.to(p.dtype) @ sample.flatten(1)).view_as(p)
                _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]
            if p.summed_grad is not None:  # type: ignore[attr-defined]
                p.summed_grad += grad  # type: ignore[attr-defined]
            else:
                p.summed_grad = grad  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        for book in self.books:
            book.clear()


def books_for(model: nn.Module, tables: list[nn.Embedding]) -> list[RowSampledTable | LinearBook]:
    """Row books for ``tables`` (those an example reads a small part of: a small table read
    whole, such as positions, is cheaper per example in Opacus) and a book for every linear
    layer of ``model`` whose parameters all train (a partly frozen one stays with Opacus)."""
    books: list[RowSampledTable | LinearBook] = [RowSampledTable(table) for table in tables]
    for module in model.modules():
        trainable = [p.requires_grad for p in module.parameters(recurse=False)]
        if type(module) is nn.Linear and trainable and all(trainable):
            books.append(LinearBook(module))
    return books


@contextmanager
def frozen(params: list[torch.Tensor]) -> Iterator[None]:
    """Freeze ``params``: Opacus adds no per-example hooks for them when wrapping, and autograd
    builds no batch gradient for them that the DP optimizer would discard."""
    flags = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(params, flags, strict=True):
            param.requires_grad_(flag)
