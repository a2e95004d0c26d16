"""HSTU and SASRec: the math against step-by-step references, causality, padding, training."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedrec.data.batching import training_batch
from fedrec.models import build_model, model_config, model_names
from fedrec.models.base import attention_mask
from fedrec.models.hstu import HSTULayer
from fedrec.models.hstu.model import time_buckets


def tiny(name: str, **overrides):
    params = dict(
        max_len=12, embedding_dim=8, num_blocks=2, num_heads=2, dropout=0.0, num_negatives=5
    )
    params.update(overrides)
    torch.manual_seed(0)
    return build_model(name, 20, model_config(name, params)).eval()


def random_history(batch=3, length=12, padding=(0, 3, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 21, (batch, length), generator=generator)
    times = torch.cumsum(torch.randint(0, 5000, (batch, length), generator=generator), dim=1)
    for row, pad in enumerate(padding[:batch]):
        items[row, :pad] = 0
        times[row, :pad] = 0
    return items, times


def reference_bucket(gap: float, num_buckets: int) -> int:
    return min(max(int(math.log(max(abs(gap), 1)) / 0.301), 0), num_buckets)


def reference_hstu_layer(
    layer: HSTULayer, x: torch.Tensor, times: torch.Tensor, valid: torch.Tensor
):
    """One sequence, one position at a time, straight from the paper's equations."""
    length, dim = x.shape
    heads, dq, dv = layer.heads, layer.attention_dim, layer.linear_dim
    w_pos = layer.relative_bias.position_weights
    w_time = layer.relative_bias.time_weights
    num_buckets = len(w_time) - 1
    projected = [F.silu(layer.uvqk(F.layer_norm(x[i], (dim,), eps=1e-6))) for i in range(length)]
    u = [p[: heads * dv] for p in projected]
    v = [p[heads * dv : 2 * heads * dv].view(heads, dv) for p in projected]
    q = [p[2 * heads * dv : 2 * heads * dv + heads * dq].view(heads, dq) for p in projected]
    k = [p[2 * heads * dv + heads * dq :].view(heads, dq) for p in projected]
    out = []
    for i in range(length):
        per_head = []
        for h in range(heads):
            acc = torch.zeros(dv)
            for j in range(i + 1):
                if not (valid[j] or j == i):
                    continue
                bias = (
                    w_pos[j - i + layer.max_len - 1]
                    + w_time[reference_bucket(float(times[i] - times[j]), num_buckets)]
                )
                a = F.silu(q[i][h] @ k[j][h] + bias) / layer.max_len
                acc = acc + a * v[j][h]
            per_head.append(acc)
        attended = torch.cat(per_head)
        gated = F.layer_norm(attended, (heads * dv,), eps=1e-6) * u[i]
        out.append(x[i] + layer.output(gated))
    return torch.stack(out)


def test_time_buckets_are_log_scaled():
    times = torch.tensor([[0, 1, 2, 10, 1000, 10**7]])
    got = time_buckets(times, num_buckets=20)
    for i in range(6):
        for j in range(6):
            assert got[0, i, j] == reference_bucket(float(times[0, i] - times[0, j]), 20)


def test_hstu_layer_matches_step_by_step_reference():
    model = tiny("hstu")
    items, times = random_history()
    x = torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(1))
    layer = model.layers[0]
    fast = layer(x, time_buckets(times, model.num_time_buckets), attention_mask(items).float())
    for row in range(3):
        slow = reference_hstu_layer(layer, x[row], times[row], items[row] > 0)
        valid = items[row] > 0
        torch.testing.assert_close(fast[row][valid], slow[valid], rtol=1e-5, atol=1e-5)


def test_hstu_encode_matches_reference_composition():
    model = tiny("hstu")
    items, times = random_history()
    got = model.encode(items, times)
    x = model.embed_inputs(items)
    for row in range(3):
        valid = items[row] > 0
        h = x[row]
        for layer in model.layers:
            h = reference_hstu_layer(layer, h, times[row], valid) * valid.unsqueeze(-1)
        torch.testing.assert_close(got[row][valid], h[valid], rtol=1e-5, atol=1e-5)


def test_hstu_last_query_path_equals_the_last_position_of_encode():
    model = tiny("hstu", num_blocks=3)
    items, times = random_history()
    last = model.encode(items, times, last_only=True)
    assert last.shape == (3, 1, 8)
    torch.testing.assert_close(last[:, 0], model.encode(items, times)[:, -1], rtol=1e-6, atol=1e-6)
    layer = model.layers[0]
    x = torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(1))
    buckets, mask = time_buckets(times, model.num_time_buckets), attention_mask(items).float()
    torch.testing.assert_close(
        layer(x, buckets, mask, last_only=True),
        layer(x, buckets, mask)[:, -1:],
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(
        model.user_vectors(items, times), model._normalize(model.encode(items, times)[:, -1])
    )


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_changing_a_later_item_never_changes_an_earlier_output(name):
    model = tiny(name)
    items, times = random_history(padding=(0, 2, 5))
    base = model.encode(items, times)
    for position in range(5, 12):
        changed_items, changed_times = items.clone(), times.clone()
        changed_items[:, position] = (changed_items[:, position] % 20) + 1
        changed_times[:, position:] += 777_777
        out = model.encode(changed_items, changed_times)
        torch.testing.assert_close(out[:, :position], base[:, :position], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, position], base[:, position])


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_extra_left_padding_does_not_change_scores(name):
    model = tiny(name)
    items, times = random_history(batch=1, length=6, padding=(1,))
    padded_items = torch.cat([torch.zeros(1, 6, dtype=torch.long), items], dim=1)
    padded_times = torch.cat([torch.zeros(1, 6, dtype=torch.long), times], dim=1)
    torch.testing.assert_close(
        model.score_all(items, times),
        model.score_all(padded_items, padded_times),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_training_reduces_the_loss(name, loss, small_split):
    model = build_model(
        name,
        small_split.num_items,
        model_config(name, {"max_len": 20, "embedding_dim": 16, "loss": loss}),
    )
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    inputs, times, targets = training_batch(small_split, np.arange(small_split.num_users), 20)
    model.train()
    losses = []
    for _ in range(40):
        loss_value = model.loss(inputs, times, targets)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_position_losses_are_zero_on_padding_and_reduce_to_the_mean():
    model = tiny("sasrec", loss="full_softmax")
    items, times = random_history()
    targets = torch.where(items > 0, (items % 20) + 1, 0)
    losses, valid = model.position_losses(items, times, targets)
    assert (losses[~valid] == 0).all() and (losses[valid] > 0).all()
    torch.testing.assert_close(model.loss(items, times, targets), losses.sum() / valid.sum())


def test_registry_and_config_validation():
    assert {"hstu", "sasrec"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown model"):
        model_config("nope")
    with pytest.raises(ValueError, match="unknown option"):
        model_config("hstu", {"embeding_dim": 4})
    with pytest.raises(ValueError, match="dropout"):
        model_config("sasrec", {"dropout": 1.5})
    with pytest.raises(ValueError, match="loss"):
        model_config("hstu", {"loss": "bpr"})
    config = model_config("hstu", {"embedding_dim": 10})
    assert config.attention_dim == 10 and config.linear_dim == 10
    assert dataclasses.asdict(config)["max_len"] == 200


def test_sequences_longer_than_max_len_are_rejected():
    model = tiny("hstu")
    with pytest.raises(ValueError, match="max_len"):
        model.encode(torch.ones(1, 13, dtype=torch.long), torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_opacus_per_sample_gradients_equal_one_example_at_a_time(name):
    """The models are written so that Opacus' per-sample gradients are exact (sampled softmax)."""
    from opacus import GradSampleModule

    model = tiny(name, dropout=0.0, num_negatives=4).train()  # Opacus records in train mode only
    reference = copy.deepcopy(model)
    items, times = random_history(batch=4, length=12, padding=(0, 3, 7, 0))
    targets = torch.where(items > 0, (items % 20) + 1, 0)

    class PerSequenceLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, items, times, targets):
            losses, valid = self.inner.position_losses(items, times, targets)
            return losses.sum(1) / valid.sum(1)

    torch.manual_seed(1)  # the same negatives in both computations
    GradSampleModule(PerSequenceLoss(model), loss_reduction="sum")(
        items, times, targets
    ).sum().backward()
    for row in range(4):
        reference.zero_grad()
        torch.manual_seed(1)
        losses, valid = reference.position_losses(items, times, targets)
        (losses[row].sum() / valid[row].sum()).backward()
        for (param_name, param), (_, ref) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
            torch.testing.assert_close(
                param.grad_sample[row], expected, atol=1e-5, rtol=1e-4, msg=param_name
            )
