"""DP-SGD through Opacus against oracles: plain gradients, and clipped one-at-a-time gradients."""

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from fedrec.models import build_model, model_config
from fedrec.privacy import PrivacyLedger, dp_sgd, epsilon
from fedrec.privacy.dp_sgd import DPSGDConfig, dp_train, per_example_loss, user_examples


def tiny(name):
    torch.manual_seed(0)
    params = dict(max_len=10, embedding_dim=8, num_heads=2, dropout=0.0, num_negatives=6)
    return build_model(name, 80, model_config(name, params))


@pytest.fixture
def fixed_negatives(monkeypatch):
    """Sampled negatives as a fixed function of their shape, so the batched step and the oracle
    score the same negatives (the DataLoader draws from the global generator in between)."""

    def randint(low, high, size, **kwargs):
        count = int(np.prod(size))
        return (torch.arange(count) * 7 % (high - low) + low).reshape(size)

    monkeypatch.setattr(torch, "randint", randint)


def one_sgd_step_update(model, examples, clip, batch_size, mode="auto"):
    """Parameter change of one noiseless DP-SGD step (SGD, lr 1) on a fixed batch."""
    before = copy.deepcopy(model.state_dict())
    config = DPSGDConfig(
        noise_multiplier=0.0, max_grad_norm=clip, batch_size=batch_size, grad_sample_mode=mode
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_train(
        model,
        examples,
        config,
        epochs=1,
        learning_rate=1.0,
        poisson_sampling=False,
        optimizer=optimizer,
    )
    return {name: model.state_dict()[name] - before[name] for name in before}


def oracle_update(model, examples, clip):
    """-(1/B) Σ_i clip(∇ℓ_i): each example's gradient computed on its own."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    items, times, targets = examples.tensors
    factors = []
    for row in range(len(items)):
        model.zero_grad()
        full_losses = per_example_loss(model, items, times, targets)
        full_losses[row].backward()
        grads = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()
        }
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        factors.append(factor)
        for name in total:
            total[name] += grads[name] * factor
    return {name: -value / len(items) for name, value in total.items()}, factors


# bookkeeping: tables as rows, linear layers by book-keeping (fedrec.privacy.bookkeeping, the
# default for sequential recommenders);
# hooks: Opacus' dense per-example gradients, with fedrec's rule for HSTU's relative bias;
# functorch: Opacus' torch.func path for every layer (none of fedrec's rules).
@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "functorch"])
@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_dp_sgd_update_equals_the_oracle(name, clip, mode, small_split, fixed_negatives):
    assert_update_equals_the_oracle(tiny(name), clip, mode, small_split)


def assert_update_equals_the_oracle(model, clip, mode, small_split):
    examples = user_examples(small_split, np.arange(6), max_len=10)
    oracle_model = copy.deepcopy(model).train()
    expected, factors = oracle_update(oracle_model, examples, clip)
    assert all(f < 1 for f in factors) if clip < 1 else all(f == 1 for f in factors)
    got = one_sgd_step_update(model, examples, clip, batch_size=6, mode=mode)
    for param_name, change in expected.items():
        torch.testing.assert_close(got[param_name], change, atol=2e-6, rtol=1e-4, msg=param_name)
    if clip == 1e6:  # no clipping: the plain batch gradient of the mean loss
        plain = copy.deepcopy(oracle_model)
        plain.zero_grad()
        per_example_loss(plain, *examples.tensors).mean().backward()
        for param_name, param in plain.named_parameters():
            torch.testing.assert_close(got[param_name], -param.grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("without_a_rule", [None, nn.LayerNorm])
def test_bookkeeping_leaves_only_layers_without_an_opacus_rule_to_opacus_hooks(
    without_a_rule, small_split, fixed_negatives, monkeypatch
):
    """Every SASRec layer has a book, so Opacus' hooks are not attached at all; with layer norms
    lacking Opacus' rule, they alone go to Opacus' hooks (its torch.func fallback) beside the
    books. The clipped update equals the one-example-at-a-time oracle either way."""
    hooked = []

    class Spy(GradSampleModule):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            hooked.append(sorted(name for name, p in module.named_parameters() if p.requires_grad))

    monkeypatch.setattr(dp_sgd, "GradSampleModule", Spy)
    if without_a_rule is not None:
        monkeypatch.delitem(GradSampleModule.GRAD_SAMPLERS, without_a_rule)
    assert_update_equals_the_oracle(tiny("sasrec"), 0.05, "bookkeeping", small_split)
    if without_a_rule is None:
        assert hooked == []
    else:
        [names] = hooked
        assert names and all("norm" in name for name in names), names


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_bookkeeping_training_equals_opacus_dense_training_with_noise(name, small_split):
    """Several Poisson steps with noise and Adam: book-keeping draws the same batches and noise
    as Opacus' dense per-example gradients (same reproducible-mode seed), so the models agree."""
    examples = user_examples(small_split, np.arange(12), max_len=10)
    trained = {}
    for mode in ("bookkeeping", "hooks"):
        model = tiny(name)
        config = DPSGDConfig(
            noise_multiplier=0.7, max_grad_norm=0.05, batch_size=4, grad_sample_mode=mode
        )
        torch.manual_seed(1)  # the negatives
        result = dp_train(model, examples, config, epochs=2, learning_rate=1e-2, noise_seed=5)
        trained[mode] = (model.state_dict(), result.steps)
    assert trained["bookkeeping"][1] == trained["hooks"][1] == 6
    for key, value in trained["hooks"][0].items():
        torch.testing.assert_close(trained["bookkeeping"][0][key], value, atol=1e-5, rtol=1e-4)
    assert not torch.equal(
        trained["bookkeeping"][0]["item_embedding.weight"], tiny(name).item_embedding.weight
    )


def test_dp_sgd_refuses_what_per_example_gradients_cannot_see(small_split):
    examples = user_examples(small_split, np.arange(4), max_len=10)
    torch.manual_seed(0)
    full = build_model("hstu", 80, model_config("hstu", dict(max_len=10, loss="full_softmax")))
    with pytest.raises(ValueError, match="sampled_softmax"):
        dp_train(full, examples, DPSGDConfig(noise_multiplier=1.0), epochs=1, learning_rate=0.1)
    linear = torch.nn.Linear(10, 1)
    with pytest.raises(ValueError, match="sequential recommenders"):
        dp_train(
            linear,
            TensorDataset(torch.zeros(4, 10)),
            DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="bookkeeping"),
            epochs=1,
            learning_rate=0.1,
            loss_fn=lambda model, x: model(x).squeeze(1),
        )


def test_poisson_training_with_empty_batches_reports_what_the_ledger_needs(small_split):
    model = tiny("hstu")
    examples = user_examples(small_split, np.arange(3), max_len=10)  # tiny: empty batches happen
    before = copy.deepcopy(model.state_dict())
    result = dp_train(
        model,
        examples,
        DPSGDConfig(noise_multiplier=1.0, batch_size=1),
        epochs=5,
        learning_rate=1e-2,
    )
    assert result.steps == 15 and result.sample_rate == pytest.approx(1 / 3)
    assert result.delta == 1e-5  # a setting, not 1 / (10 · records): the count would leak
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (
        not hasattr(next(model.parameters()), "grad_sample")
        or next(model.parameters()).grad_sample is None
    )
    ledger_eps = epsilon(
        [(result.noise_multiplier, result.sample_rate, result.steps)], result.delta
    )
    assert np.isfinite(ledger_eps) and ledger_eps > 0
    assert PrivacyLedger().epsilon("client:0", 1e-5) == 0.0


@pytest.mark.parametrize("without_a_rule", [None, nn.LayerNorm])
def test_a_last_empty_batch_leaves_no_per_example_state_on_the_model(
    without_a_rule, small_split, monkeypatch
):
    """Poisson batches ending with an empty one (noise only), every layer booked or layer norms
    left to Opacus' hooks: the trained model carries no per-example gradients afterwards."""
    examples = user_examples(small_split, np.arange(3), max_len=10)
    batches = [list(examples.tensors), [t[:0] for t in examples.tensors]]
    monkeypatch.setattr(dp_sgd.DPDataLoader, "from_data_loader", lambda loader: batches)
    if without_a_rule is not None:
        monkeypatch.delitem(GradSampleModule.GRAD_SAMPLERS, without_a_rule)
    model = tiny("sasrec")
    before = copy.deepcopy(model.state_dict())
    config = DPSGDConfig(noise_multiplier=1.0, batch_size=1)
    assert dp_train(model, examples, config, epochs=1, learning_rate=1e-2).steps == 2
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_epsilon_is_met_by_the_solved_noise(small_split):
    model = tiny("sasrec")
    examples = user_examples(small_split, np.arange(20), max_len=10)
    config = DPSGDConfig(target_epsilon=3.0, batch_size=5)
    result = dp_train(model, examples, config, epochs=2, learning_rate=1e-3)
    spent = epsilon([(result.noise_multiplier, result.sample_rate, result.steps)], result.delta)
    assert 2.9 <= spent <= 3.0


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        DPSGDConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DPSGDConfig(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="magic")
    with pytest.raises(ValueError, match="no training examples"):
        dp_train(
            tiny("hstu"),
            TensorDataset(torch.zeros(0, 10)),
            DPSGDConfig(noise_multiplier=1.0),
            1,
            1e-3,
        )
