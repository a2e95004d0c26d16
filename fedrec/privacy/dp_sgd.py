"""Record-level DP-SGD for sequential recommenders, through Opacus.

Opacus does the per-example clipping, the noise and the accounting (``PrivacyEngine`` with
Poisson sampling); this module only shapes our sequences into per-example losses. A record is
one training example: a window of a user's sequence (event-level protection when a client is
one user) or one user's whole sequence (user-level protection inside a cross-silo client).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrec.data.batching import training_batch
from fedrec.data.split import SequenceSplit
from fedrec.models.base import SequentialRecommender
from fedrec.privacy import grad_samplers  # noqa: F401  (registers HSTU's Opacus rules)
from fedrec.privacy.accounting import ACCOUNTANTS
from fedrec.privacy.bookkeeping import (
    Book,
    BookkeepingDPOptimizer,
    books_for,
    frozen,
)
from fedrec.privacy.randomness import torch_generator

GRAD_SAMPLE_MODES = ("auto", "bookkeeping", "hooks", "functorch", "ew", "ghost")
DEFAULT_RECORD_DELTA = 1e-5


@dataclass
class DPSGDConfig:
    """Give either ``noise_multiplier`` or ``target_epsilon``: the whole run's ε at ``delta`` for a
    client that joins every round (σ is solved for ``num_rounds × local_epochs`` epochs).

    ``batch_size`` is the expected Poisson batch size. ``delta`` is a setting, not derived from
    the data (a record count would leak through it): 1e-5 by default, far below 1 / records.
    ``accountant``: Opacus' ``rdp`` or ``prv``, used for the solve and by every ledger.
    ``grad_sample_mode``: Opacus' per-sample gradients (``hooks``, ``functorch``, ``ew``),
    ``ghost`` clipping (norms without materialising per-sample gradients; Opacus refuses it
    for tied parameters such as HSTU's and SASRec's item table — use it for the LLM adapters),
    or ``bookkeeping`` for sequential recommenders: one backward pass, embedding tables' per-example
    gradients kept as the rows each example read and linear layers' norms by book-keeping
    (``fedrec.privacy.bookkeeping``; the same clipped sums, faster on HSTU). ``auto``
    (default): ``bookkeeping`` for a sequential recommender, else ``hooks``.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_RECORD_DELTA
    max_grad_norm: float = 1.0
    batch_size: int = 32
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp: set exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError("dp.noise_multiplier must be >= 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("dp.target_epsilon must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError("dp.delta must lie in (0, 1)")
        if self.max_grad_norm <= 0 or self.batch_size < 1:
            raise ValueError("dp: max_grad_norm must be > 0 and batch_size >= 1")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {sorted(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"dp.grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")


@dataclass(frozen=True)
class DPPlan:
    """What a DP-SGD run on ``records`` examples will spend: known before training starts."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    batch_size: int


def plan_dp(records: int, config: DPSGDConfig, epochs: int, rounds: int = 1) -> DPPlan:
    """Batching, σ and steps of one DP-SGD run of ``epochs``. With ``target_epsilon``, σ is
    solved so that ``rounds`` such runs together spend it."""
    if records == 0:
        raise ValueError("no training examples: nothing to train on")
    delta = config.delta
    batch_size = min(config.batch_size, records)
    batches = -(-records // batch_size)
    sample_rate = 1.0 / batches
    sigma = config.noise_multiplier
    if sigma is None:
        assert config.target_epsilon is not None
        sigma = get_noise_multiplier(
            target_epsilon=config.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            epochs=epochs * rounds,
            accountant=config.accountant,
        )
    return DPPlan(float(sigma), sample_rate, epochs * batches, delta, batch_size)


@dataclass
class DPTrainResult:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    mean_loss: float


def user_examples(split: SequenceSplit, users: np.ndarray, max_len: int) -> TensorDataset:
    """One example per user: the most recent window of the training history."""
    return TensorDataset(*training_batch(split, users, max_len))


def per_example_loss(
    model: SequentialRecommender, items: torch.Tensor, times: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean next-item loss of each example, ``[B]``: the quantity DP-SGD clips per example."""
    losses, valid = model.position_losses(items, times, targets)
    return losses.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def grad_sample_mode_for(model: nn.Module, mode: str) -> str:
    """The per-example gradient engine ``mode`` means for ``model`` (resolves ``auto``)."""
    sequential = isinstance(model, SequentialRecommender)
    if isinstance(model, SequentialRecommender) and model.config.loss == "full_softmax":
        raise ValueError(
            "DP-SGD needs model.loss: sampled_softmax; the full softmax scores every item "
            "through the item table directly, where per-example gradients cannot see it"
        )
    if mode == "auto":
        return "bookkeeping" if sequential else "hooks"
    if mode == "bookkeeping" and not sequential:
        raise ValueError(
            "dp.grad_sample_mode 'bookkeeping' is for sequential recommenders (HSTU, SASRec); "
            "use 'hooks' (or 'auto') for this model"
        )
    return mode


def ignore_harmless_opacus_warnings() -> None:
    # Secure RNG: Opacus means its torchcsprng mode; our noise and masks come from a generator
    # seeded from OS entropy (fedrec.privacy.randomness). The backward-hook warning fires because
    # the first layer's inputs are integer ids; the autocast one is about bfloat16 on CPU.
    for message in (".*[Ss]ecure RNG.*", "Full backward hook is firing", "In CPU autocast"):
        warnings.filterwarnings("ignore", message=message)


class _BatchReads(TensorDataset):
    """Serves a batch with one index per tensor, where PyTorch's default reads each example
    and stacks them: 0.8 ms of a 9 ms HSTU DP-SGD step on ML-100K."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[index] for tensor in self.tensors]


def _as_read(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


PerExampleLoss = Callable[..., torch.Tensor]  # (model, *batch tensors) -> losses [B]


def dp_train(
    model: nn.Module,
    examples: TensorDataset,
    config: DPSGDConfig,
    epochs: int,
    learning_rate: float,
    poisson_sampling: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: PerExampleLoss = per_example_loss,
    noise_seed: int | None = None,
    rounds: int = 1,
) -> DPTrainResult:
    """Train ``model``'s trainable parameters in place with DP-SGD and report what the privacy
    ledger needs. ``loss_fn(model, *batch)`` gives one loss per example of a batch of
    ``examples``' tensors.

    Empty Poisson batches still take a (noise-only) optimizer step, which the accountant counts;
    the model is not run on them (some models fail on zero rows). The model is returned to a
    plain module afterwards (Opacus hooks removed). Noise and Poisson masks come from a private
    generator; ``noise_seed`` replaces it only in the explicit reproducible mode.
    ``rounds``: how many such runs ``config.target_epsilon`` covers.
    """
    plan = plan_dp(len(examples), config, epochs, rounds)
    generator = torch_generator(noise_seed)
    loader = DataLoader(
        _BatchReads(*examples.tensors),
        batch_size=plan.batch_size,
        generator=generator,
        collate_fn=_as_read,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.Adam(trainable, lr=learning_rate)
    mode = grad_sample_mode_for(model, config.grad_sample_mode)
    ghost = mode == "ghost"
    books: list[Book] = []
    hooked = trainable  # the parameters whose per-example gradients Opacus' hooks compute
    stack = ExitStack()  # Opacus' hooks come off, booked weights stay frozen, until the end
    with warnings.catch_warnings():
        ignore_harmless_opacus_warnings()
        if mode == "bookkeeping":
            assert isinstance(model, SequentialRecommender)
            item_table = model.item_embedding
            books = books_for(model, [item_table] if item_table.weight.requires_grad else [])
            booked = [p for book in books for p in book.params]
            stack.enter_context(frozen(booked))
            hooked = [p for p in trainable if p.requires_grad]  # the layers no book covers
            if hooked:
                hooks = GradSampleModule(model, batch_first=True, loss_reduction="mean")
                if poisson_sampling:
                    hooks.forbid_grad_accumulation()
                stack.callback(hooks._close)
            # As PrivacyEngine.make_private batches and scales (its optimizer class is fixed).
            private_loader = DPDataLoader.from_data_loader(loader) if poisson_sampling else loader
            dp_optimizer: DPOptimizer = BookkeepingDPOptimizer(
                optimizer,
                books=books,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=int(len(examples) / len(loader)),
                generator=generator,
            )
        else:
            # Ghost clipping wants a criterion and returns it as a third value; our losses are
            # already per example, so the criterion is never called (see the backward below).
            made = PrivacyEngine(accountant=config.accountant).make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                poisson_sampling=poisson_sampling,
                grad_sample_mode=mode,
                noise_generator=generator,
                **({"criterion": nn.MSELoss()} if ghost else {}),
            )
            private, dp_optimizer, private_loader = made[0], made[1], made[-1]
            stack.callback(private._close)
    model.train()
    steps, losses = 0, []
    try:
        with warnings.catch_warnings():
            ignore_harmless_opacus_warnings()
            for _ in range(epochs):
                for batch in private_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(batch[0]):
                        per_example = loss_fn(model, *batch)
                        if ghost:  # two backward passes: norms, then clipped gradients
                            DPTensorFastGradientClipping(
                                private, dp_optimizer, per_example, "mean"
                            ).backward()
                        else:
                            per_example.mean().backward()
                        losses.append(per_example.mean().item())
                    elif ghost:  # noise only
                        for param in trainable:
                            param.grad = torch.zeros_like(param)
                    else:  # Opacus' zero-row convention: noise only (books hold no rows)
                        for param in hooked:
                            param.grad_sample = param.new_zeros((0, *param.shape))  # type: ignore[attr-defined]
                    dp_optimizer.step()
                    steps += 1
    finally:
        for book in books:
            book.remove()
        stack.close()
    return DPTrainResult(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        delta=plan.delta,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
    )
