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
- every other layer with an Opacus per-example rule (positions, HSTU's relative bias, layer
  norms) keeps its inputs and output gradients the same way and is given to that rule. Opacus'
  own hooks (``GradSampleModule``) wrap each such layer's inputs and outputs in a
  ``BackwardHookFunction``: 0.9 ms of a 14 ms HSTU step at batch 32. A layer without a rule
  stays with them.

The booked weights are frozen while training so that autograd does not also build dense batch
gradients the DP optimizer would discard. No library does this for tied tables in one pass, so
it is written here; Poisson batches, noise and the step stay Opacus'.
``tests/test_dp_sgd.py`` checks it against Opacus' dense path and against gradients computed
one example at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn


def _on_output_grad(
    output: torch.Tensor, capture: Callable[[torch.Tensor], None]
) -> torch.Tensor | None:
    """Have ``capture`` called with ``output``'s gradient in the backward pass. An output that
    needs no gradient (computed from ids or data alone, the weights frozen) becomes the graph's
    leaf, returned to replace the module's output: autograd stops there instead of building a
    weight gradient the DP optimizer would replace anyway."""
    if output.requires_grad:
        output.register_hook(capture)
        return None
    leaf = output.detach().requires_grad_(True)
    leaf.register_hook(capture)
    return leaf


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

        return _on_output_grad(output, capture)

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
            batch, rows = ids.shape[0], self.weight.shape[0]
            examples = torch.arange(batch, device=ids.device).unsqueeze(1)
            keys, inverse = torch.unique((examples * rows + ids).reshape(-1), return_inverse=True)
            inverse = inverse.view(batch, -1)
            summed = self._grads[0].new_zeros(len(keys), self.weight.shape[1])
            start = 0  # each lookup's gradients added where they are: no [B, 2L + R, D] copy
            for grads in self._grads:
                width = grads.shape[1]
                summed.index_add_(
                    0, inverse[:, start : start + width].reshape(-1), grads.flatten(0, 1)
                )
                start += width
            self._coalesced = (keys // rows, keys % rows, summed, batch)
        return self._coalesced

    def squared_norms(self) -> torch.Tensor:
        """``[B]``: each example's squared gradient norm over the whole table."""
        example, row, summed, batch = self._rows()
        per_row = summed.pow(2).sum(dim=1)
        if self.padding_idx is not None:  # nn.Embedding never updates the padding row
            per_row.masked_fill_(row == self.padding_idx, 0.0)
        # The loss is the batch mean (Opacus' "mean" reduction): undo the 1/B.
        return per_row.new_zeros(batch).index_add_(0, example, per_row) * batch**2

    def clipped_sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """``[Σ_b factors[b] · grad_b]`` as a dense table gradient."""
        example, row, summed, batch = self._rows()
        scaled = summed * (factors.to(summed.dtype) * batch)[example].unsqueeze(1)
        table = torch.zeros_like(self.weight).index_add_(0, row, scaled)
        if self.padding_idx is not None:
            table[self.padding_idx] = 0.0
        return [table]


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
        self._handle = linear.register_forward_hook(self._after)

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        inputs = args[0].detach()
        batch = inputs.shape[0]

        def capture(grad: torch.Tensor) -> None:
            self._inputs.append(inputs.reshape(batch, -1, inputs.shape[-1]))
            self._grads.append(grad.reshape(batch, -1, grad.shape[-1]))

        return _on_output_grad(output, capture)

    def clear(self) -> None:
        self._inputs, self._grads, self._kept = [], [], None

    def remove(self) -> None:
        self._handle.remove()
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
        batch, steps, width_in, width_out = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        per_example: torch.Tensor | None = None
        if steps * (width_in + width_out) >= width_in * width_out:  # ghost norm costs more
            per_example = torch.bmm(g.transpose(1, 2), a).view(batch, width_out * width_in)
            squared = per_example.pow(2).sum(dim=1)
        else:
            squared = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
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
            sums = [(factors @ per_example).view_as(self.weight)]
        elif a.shape[-1] < g.shape[-1]:  # scale the narrower of the two
            sums = [g.flatten(0, 1).T @ (a * factors[:, None, None]).flatten(0, 1)]
        else:
            sums = [(g * factors[:, None, None]).flatten(0, 1).T @ a.flatten(0, 1)]
        if bias is not None:
            sums.append(factors @ bias)
        return sums


class RuleBook:
    """Keeps the inputs and output gradient of every training call of ``module`` and gives them
    to Opacus' per-example gradient rule for its type (dense per-example gradients: for layers
    whose parameters are small)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = [p for p in module.parameters(recurse=False)]
        self.rule = GradSampleModule.GRAD_SAMPLERS[type(module)]
        self._calls: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._samples: list[torch.Tensor] | None = None
        self._handle = module.register_forward_hook(self._after)

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        inputs = [arg.detach() for arg in args]
        return _on_output_grad(output, lambda grad: self._calls.append((inputs, grad)))

    def clear(self) -> None:
        self._calls, self._samples = [], None

    def remove(self) -> None:
        self._handle.remove()
        self.clear()

    def samples(self) -> list[torch.Tensor]:
        """``[B, numel]`` per parameter: each example's gradient (of the batch-mean loss), summed
        over the step's calls."""
        if self._samples is None:
            totals: dict[int, torch.Tensor] = {}
            with unfrozen(self.params):  # Opacus' rules skip a parameter that is frozen
                for inputs, grad in self._calls:
                    for param, sample in self.rule(self.module, inputs, grad).items():
                        flat = sample.flatten(1)
                        totals[id(param)] = (
                            totals[id(param)] + flat if id(param) in totals else flat
                        )
            self._samples = [totals.get(id(p), p.new_zeros(0, p.numel())) for p in self.params]
        return self._samples

    # The output gradients are those of the batch mean (Opacus' "mean" reduction): the norms and
    # sums undo the 1/B, as Opacus scales its output gradients before the rule.

    def squared_norms(self) -> torch.Tensor:
        parts = [sample.pow(2).sum(dim=1) for sample in self.samples() if len(sample)]
        if not parts:
            return self.params[0].new_zeros(0)
        return torch.stack(parts).sum(dim=0) * len(parts[0]) ** 2

    def clipped_sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        return [
            ((factors.to(p.dtype) * len(sample)) @ sample).view_as(p)
            if len(sample)
            else torch.zeros_like(p)
            for p, sample in zip(self.params, self.samples(), strict=True)
        ]


Book = RowSampledTable | LinearBook | RuleBook


class BookkeepingDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (flat clipping, noise, step hooks) whose clipping also covers
    the parameters kept by ``books``: one norm per example over every parameter, as Opacus
    computes it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        books: list[Book],
        **kwargs: Any,
    ) -> None:
        self.books = books
        self._booked = {id(p) for book in books for p in book.params}
        # Opacus lists the parameters that require grad (the booked ones are frozen meanwhile)
        # each time it is asked, several times a step.
        self._params = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad or id(p) in self._booked
        ]
        self._dense_params = [p for p in self._params if id(p) not in self._booked]
        super().__init__(optimizer, **kwargs)

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    def _dense(self) -> list[nn.Parameter]:
        return self._dense_params

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in self._dense()]

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        # Opacus' pre_step returns before clipping and noise when no parameter has per-example
        # gradients of Opacus' own (its "no trainable parameters" case); here the books hold
        # them, perhaps all of them, so every step is clipped and noised.
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        if self.secure_mode:
            self.add_noise()
            self.scale_grad()
        else:
            self._add_noise_and_scale()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _add_noise_and_scale(self) -> None:
        # Opacus' add_noise then scale_grad, drawing the same noise in the same order, with
        # one new tensor per parameter instead of four (zeros, noise, sum, quotient): the
        # small tensor operations are what a DP step at batch 32 costs beyond a plain one.
        std = self.noise_multiplier * self.max_grad_norm
        denominator = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            summed: torch.Tensor = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            if std == 0:
                grad = summed.clone()
            else:
                grad = torch.normal(
                    0.0,
                    std,
                    summed.shape,
                    generator=self.generator,
                    dtype=summed.dtype,
                    device=summed.device,
                ).add_(summed)
            p.grad = (
                grad.view_as(p).div_(denominator)
                if self.loss_reduction == "mean"
                else grad.view_as(p)
            )
            _mark_as_processed(summed)

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


def books_for(model: nn.Module, tables: list[nn.Embedding]) -> list[Book]:
    """Row books for ``tables`` (those an example reads a small part of: a small table read
    whole, such as positions, is cheaper as dense per-example gradients), a ``LinearBook`` for
    every linear layer of ``model`` and a ``RuleBook`` for every other layer with an Opacus
    rule, each if its parameters all train (a partly frozen layer, or one without a rule,
    stays with Opacus' hooks)."""
    books: list[Book] = [RowSampledTable(table) for table in tables]
    tabled = {id(table) for table in tables}
    for module in model.modules():
        trainable = [p.requires_grad for p in module.parameters(recurse=False)]
        if id(module) in tabled or not (trainable and all(trainable)):
            continue
        if type(module) is nn.Linear:
            books.append(LinearBook(module))
        elif type(module) in GradSampleModule.GRAD_SAMPLERS:
            books.append(RuleBook(module))
    return books


@contextmanager
def _requiring_grad(params: Sequence[torch.Tensor], flag: bool) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(flag)
    try:
        yield
    finally:
        for param, old in zip(params, flags, strict=True):
            param.requires_grad_(old)


def unfrozen(params: Sequence[torch.Tensor]) -> AbstractContextManager[None]:
    """Let ``params`` require grad for a moment (Opacus' rules compute only for those)."""
    return _requiring_grad(params, True)


def frozen(params: Sequence[torch.Tensor]) -> AbstractContextManager[None]:
    """Freeze ``params``: Opacus adds no per-example hooks for them when wrapping, and autograd
    builds no batch gradient for them that the DP optimizer would discard."""
    return _requiring_grad(params, False)
