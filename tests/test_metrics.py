"""Full-ranking metrics against brute-force per-user references."""

import math

import numpy as np
import pytest
import torch

from fedrec.evaluation import EvalConfig, evaluate, popularity_scorer, rank_metrics, target_ranks


def reference_rank(scores: list[float], target: int) -> int:
    """Pessimistic rank by sorting: the target goes after every item with an equal score."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j == target))
    return order.index(target) + 1


def reference_metrics(rank: int, ks) -> dict[str, float]:
    out = {"MRR": 1.0 / rank}
    for k in ks:
        out[f"HR@{k}"] = float(rank <= k)
        out[f"NDCG@{k}"] = 1.0 / math.log2(rank + 1) if rank <= k else 0.0
    return out


@pytest.mark.parametrize("levels", [None, 3])
def test_target_ranks_match_sorting_including_ties(levels):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 40, generator=generator)
    if levels:  # heavy ties
        scores = (scores * levels).floor()
    targets = torch.randint(0, 40, (50,), generator=generator)
    ranks = target_ranks(scores, targets)
    for row in range(50):
        assert ranks[row].item() == reference_rank(scores[row].tolist(), targets[row].item())


def test_constant_scores_earn_nothing():
    ranks = target_ranks(torch.zeros(3, 100), torch.tensor([0, 50, 99]))
    assert ranks.tolist() == [100, 100, 100]


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]))


def test_rank_metrics_formulas():
    ks = (1, 5, 10)
    ranks = torch.tensor([1, 2, 5, 6, 11, 100])
    got = rank_metrics(ranks, ks)
    for i, rank in enumerate(ranks.tolist()):
        for name, value in reference_metrics(rank, ks).items():
            assert got[name][i].item() == pytest.approx(value)


def test_evaluate_matches_brute_force_with_history_exclusion(small_split):
    num_items = small_split.num_items
    table = torch.from_numpy(np.random.default_rng(2).random((small_split.num_users, num_items)))
    # exact ties with the target for every fifth user, to exercise the pessimistic rule
    targets = small_split.targets("test")
    tied = np.arange(0, small_split.num_users, 5)
    table[tied, (targets[tied] + 1) % num_items] = table[tied, targets[tied]]
    ks = (1, 5, 10)
    for exclude in (True, False):
        config = EvalConfig(ks=ks, exclude_history=exclude, batch_size=7)
        result = evaluate(lambda users, stage: table[users], small_split, "test", config)
        expected: dict[str, list[float]] = {}
        topk: dict[int, set[int]] = {k: set() for k in ks}
        for user in range(small_split.num_users):
            scores = table[user].tolist()
            if exclude:
                for item in small_split.history(user, "test")[0]:
                    scores[item] = -math.inf
            rank = reference_rank(scores, int(targets[user]))
            for name, value in reference_metrics(rank, ks).items():
                expected.setdefault(name, []).append(value)
            order = sorted(range(num_items), key=lambda j: -scores[j])
            for k in ks:
                topk[k].update(order[:k])
        for name, values in expected.items():
            assert result.metrics[name] == pytest.approx(np.mean(values)), name
            assert np.allclose(result.per_user[name], values)
        for k in ks:
            assert result.metrics[f"Coverage@{k}"] == pytest.approx(len(topk[k]) / num_items)


def test_history_exclusion_matters(small_split):
    """A scorer that loves the history looks good without exclusion and bad with it."""

    def history_lover(users, stage):
        scores = torch.zeros(len(users), small_split.num_items)
        for row, user in enumerate(users):
            scores[row, small_split.history(user, stage)[0]] = 1.0
        return scores

    with_exclusion = evaluate(history_lover, small_split, "test", EvalConfig(ks=(10,)))
    assert with_exclusion.metrics["HR@10"] == 0.0


def test_popularity_scorer_counts_visible_histories(small_split):
    scorer = popularity_scorer(small_split)
    valid_scores = scorer(np.array([0]), "valid")[0]
    test_scores = scorer(np.array([0]), "test")[0]
    expected_train = np.zeros(small_split.num_items)
    for user in range(small_split.num_users):
        np.add.at(expected_train, small_split.train_sequence(user)[0], 1)
    assert np.array_equal(valid_scores.numpy(), expected_train)
    assert np.array_equal(
        test_scores.numpy(),
        expected_train + np.bincount(small_split.targets("valid"), minlength=small_split.num_items),
    )


def test_scorer_shape_is_checked(small_split):
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda users, stage: torch.zeros(len(users), 3), small_split, "test", EvalConfig())


def test_eval_config_validates():
    with pytest.raises(ValueError, match="ks"):
        EvalConfig(ks=(0,))


def test_a_sampled_evaluation_is_the_full_one_restricted_to_its_users(small_split):
    from fedrec.evaluation import evaluation_users

    config = EvalConfig(ks=(5,), sample_users=7)
    users = evaluation_users(small_split, config)
    assert users is not None and len(set(users.tolist())) == 7 and np.all(np.diff(users) > 0)
    assert np.array_equal(users, evaluation_users(small_split, config))  # fixed draw
    full = evaluate(popularity_scorer(small_split), small_split, "test", config)
    sampled = evaluate(popularity_scorer(small_split), small_split, "test", config, users)
    assert sampled.metrics["NDCG@5"] == pytest.approx(full.per_user["NDCG@5"][users].mean())
    every = EvalConfig(ks=(5,), sample_users=small_split.num_users)
    assert evaluation_users(small_split, every) is None
    assert evaluation_users(small_split, EvalConfig(ks=(5,))) is None
    with pytest.raises(ValueError, match="sample_users"):
        EvalConfig(sample_users=-1)
