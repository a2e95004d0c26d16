"""The multi-task ranker: its batched path against a one-pair-at-a-time oracle of the DCN-v2 and
MMoE equations, per-example gradients for DP-SGD, and that it learns what each task's labels
depend on."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule

from fedrec.models.ranking import MultiTaskRanker, RankerConfig, RankingBatch, ranker_class
from fedrec.privacy.dp_sgd import ignore_harmless_opacus_warnings


def config(**overrides):
    options = dict(
        categorical_sizes=(7, 2, 5),
        genres=6,
        code_sizes=(8, 8, 3),
        user_dim=4,
        dense=2,
        embedding_dim=4,
        experts=3,
        expert_dim=8,
        tower_dim=4,
    )
    return RankerConfig(**{**options, **overrides})


def batch(cfg: RankerConfig, size: int, seed: int = 0) -> RankingBatch:
    g = torch.Generator().manual_seed(seed)

    def values(sizes: tuple[int, ...]) -> torch.Tensor:
        columns = [torch.randint(0, n, (size,), generator=g) for n in sizes]
        return torch.stack(columns, dim=1) if columns else torch.zeros(size, 0, dtype=torch.long)

    return RankingBatch(
        categorical=values(cfg.categorical_sizes),
        genres=(torch.rand(size, cfg.genres, generator=g) < 0.3).float(),
        codes=values(cfg.code_sizes),
        user=torch.randn(size, cfg.user_dim, generator=g),
        dense=torch.randn(size, cfg.dense, generator=g),
    )


@pytest.mark.parametrize("rank", [0, 3])
def test_batched_logits_equal_the_equations_one_pair_at_a_time(rank):
    cfg = config(cross_rank=rank)
    torch.manual_seed(0)
    model = ranker_class("mmoe-dcn")(cfg).eval()
    pairs = batch(cfg, 5)
    logits = model(pairs)
    assert logits.shape == (5, 2)
    torch.testing.assert_close(logits, model.reference_logits(pairs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unused", [{}, {"categorical_sizes": (), "code_sizes": ()}])
def test_per_sample_gradients_equal_one_pair_at_a_time(unused):
    """What Opacus clips (``GradSampleModule``) is each pair's own gradient, also when a
    feature group is unused (every parameter is reached by every example)."""
    cfg = config(**unused)
    torch.manual_seed(1)
    model = MultiTaskRanker(cfg)
    pairs, labels = batch(cfg, 6, seed=2), torch.randint(0, 2, (6, 2))
    hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        ignore_harmless_opacus_warnings()
        model.per_example_loss(pairs, labels).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    hooks._close()
    for row in range(6):
        model.zero_grad()
        one = RankingBatch(*(t[row : row + 1] for t in pairs))
        model.per_example_loss(one, labels[row : row + 1]).sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(per_sample[name][row], param.grad, rtol=1e-4, atol=1e-6)
    assert set(per_sample) == {n for n, _ in model.named_parameters()}


def test_each_task_learns_what_its_labels_depend_on():
    """``like`` follows genre 0, ``engage`` the retrieval source (field 2 = 1): after training,
    each head ranks its positives above its negatives (AUC), and not the other task's."""
    cfg = config(dropout=0.1)
    torch.manual_seed(3)
    model = MultiTaskRanker(cfg)
    pairs = batch(cfg, 2048, seed=4)
    labels = torch.stack([pairs.genres[:, 0], (pairs.categorical[:, 2] == 1).float()], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for rows in torch.randperm(2048).split(128):
            loss = model.per_example_loss(RankingBatch(*(t[rows] for t in pairs)), labels[rows])
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
    model.eval()
    test = batch(cfg, 1024, seed=5)
    truth = torch.stack([test.genres[:, 0], (test.categorical[:, 2] == 1).float()], dim=1)
    with torch.no_grad():
        logits = model(test)

    def auc(score: torch.Tensor, label: torch.Tensor) -> float:
        pos, neg = score[label == 1], score[label == 0]
        return float((pos[:, None] > neg[None, :]).float().mean())

    assert auc(logits[:, 0], truth[:, 0]) > 0.95 and auc(logits[:, 1], truth[:, 1]) > 0.95
    assert abs(auc(logits[:, 0], truth[:, 1]) - 0.5) < 0.1


def test_bad_options_fail_with_the_option_named():
    with pytest.raises(ValueError, match="tasks"):
        config(tasks=("click",))
    with pytest.raises(ValueError, match="no features"):
        RankerConfig()
    with pytest.raises(ValueError, match="unknown ranker"):
        ranker_class("dlrm")
