"""Bias and fairness audits: each metric against a hand-computed case and a brute-force
reference, the federated sums against the server-side audit, re-rankers, threshold breaches."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrec.audits import AuditConfig, AuditContext, RerankConfig, audit, breaches
from fedrec.audits import metrics as m
from fedrec.audits.federated import add_sums, audit_from_sums, client_sums
from fedrec.audits.groups import activity_terciles, age_band, most_active, user_groups
from fedrec.audits.report import audit_html
from fedrec.audits.rerank import calibrated_reranker, long_tail_reranker
from fedrec.cli import app
from fedrec.config import parse_config
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import leave_one_out
from fedrec.evaluation import EvalConfig, evaluate, popularity_scorer
from fedrec.population import population_of
from simulations.inprocess import run_inprocess

# --- hand-computed cases -------------------------------------------------------------------


def test_item_metrics_by_hand():
    assert m.gini_index(np.array([0, 0, 1, 1])) == pytest.approx(0.5)  # (1·1 + 3·1) / (4·2)
    assert m.gini_index(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert m.shannon_entropy(np.array([2, 2, 0])) == pytest.approx(math.log(2))
    assert m.item_coverage(np.array([3, 0, 1, 0])) == pytest.approx(0.5)
    top_k = np.array([[0, 1], [1, 2]])
    assert m.average_popularity(top_k, np.array([10, 20, 30])) == pytest.approx(20.0)
    np.testing.assert_array_equal(m.exposure_counts(np.array([[0, 1], [1, -1]]), 3), [1, 2, 0])


def test_long_tail_and_aplt_by_hand():
    # 100 interactions; ascending 4, 6, 10 hold exactly 20 → items 4, 3, 2 are the tail.
    tail = m.long_tail_items(np.array([50, 30, 10, 6, 4]), tail_share=0.2)
    np.testing.assert_array_equal(tail, [False, False, True, True, True])
    assert m.average_long_tail_share(np.array([[0, 2], [3, 4]]), tail) == pytest.approx(0.75)


def test_pop_rsp_by_hand():
    tail = np.array([False, False, True, True])  # head {0, 1}, tail {2, 3}
    top_k = np.array([[0, 2], [1, 0]])
    seen = [np.array([1]), np.array([3])]
    # head: shown 1 + 2 = 3 of available (2-1) + 2 = 3 → 1; tail: shown 1 of 2 + 1 = 3 → 1/3
    rate = np.array([1.0, 1 / 3])
    assert m.popularity_rsp(top_k, tail, seen) == pytest.approx(rate.std() / rate.mean())


def test_calibration_by_hand():
    genres, names = m.genre_matrix(np.array(["A B", "A", "B", ""], dtype=object))
    assert names == ["A", "B"]
    np.testing.assert_allclose(genres, [[0.5, 0.5], [1, 0], [0, 1], [0, 0]])
    # History all A, list all B: q̃ = 0.99·(0, 1) + 0.01·(1, 0) → KL = ln(1 / 0.01).
    assert m.calibration_kl(np.array([1]), np.array([2]), genres) == pytest.approx(math.log(100))
    assert m.calibration_kl(np.array([0]), np.array([0]), genres) == pytest.approx(0.0)
    assert math.isnan(m.calibration_kl(np.array([3]), np.array([0]), genres))


def test_group_gap_by_hand():
    values = np.array([1.0, 1.0, 0.0, 0.0, 0.5])
    groups = np.array(["a", "a", "b", "b", ""], dtype=object)  # "" = unknown, left out
    gap = m.group_gap(values, groups, np.random.default_rng(0), resamples=200)
    assert gap.means == {"a": 1.0, "b": 0.0} and gap.counts == {"a": 2, "b": 2}
    assert (gap.gap, gap.ratio, gap.best, gap.worst) == (1.0, 0.0, "a", "b")
    assert (gap.ci_low, gap.ci_high) == (1.0, 1.0)  # constant groups: no resampling spread


def test_paired_difference_keeps_pairs_together():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, 400)  # users differ far more than the effect
    effect = 0.02 + rng.normal(0, 0.01, 400)
    d = m.paired_difference(base + effect, base, np.random.default_rng(0), resamples=4000)
    sd = effect.std(ddof=1) / np.sqrt(400)  # the normal approximation of the same interval
    assert d.mean == pytest.approx(effect.mean())
    assert d.ci_low == pytest.approx(effect.mean() - 1.96 * sd, abs=2e-4)
    assert d.ci_high == pytest.approx(effect.mean() + 1.96 * sd, abs=2e-4)
    assert d.ci_low > 0 and (d.users, d.better + d.worse) == (400, 400)
    tie = m.paired_difference(base, base, np.random.default_rng(0), resamples=100)
    assert (tie.mean, tie.ci_low, tie.ci_high, tie.better, tie.worse) == (0, 0, 0, 0, 0)


def test_groups_by_hand():
    assert [age_band(a) for a in ("17", "18", "24", "25", "49", "55", "56", "73", "25-34", "")] == [
        "<18", "18-24", "18-24", "25-34", "45-49", "50-55", "56+", "56+", "25-34", ""
    ]  # fmt: skip
    lengths = np.array([5, 1, 9, 3, 7, 2])
    np.testing.assert_array_equal(
        activity_terciles(lengths), ["mid", "low", "high", "mid", "high", "low"]
    )
    np.testing.assert_array_equal(most_active(np.arange(40)), ["rest"] * 38 + ["top-5%"] * 2)
    groups = user_groups(
        {"age": np.array(["20", "60"], dtype=object)}, np.array([1, 2]), ("age", "gender")
    )
    assert sorted(groups) == ["activity", "age", "most-active"]
    np.testing.assert_array_equal(groups["age"], ["18-24", "56+"])


# --- brute-force references on random data ----------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_gini_matches_the_mean_absolute_difference(seed):
    x = np.random.default_rng(seed).integers(0, 20, size=30).astype(float)
    brute = sum(abs(a - b) for a, b in itertools.product(x, x)) / (2 * len(x) * x.sum())
    assert m.gini_index(x) == pytest.approx(brute)


@pytest.mark.parametrize("seed", range(5))
def test_item_metrics_match_set_based_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_items, n_users, k = 25, 12, 4
    popularity = rng.integers(1, 50, size=n_items)
    top_k = np.stack([rng.choice(n_items, size=k, replace=False) for _ in range(n_users)])
    seen = [rng.choice(n_items, size=rng.integers(1, 8), replace=False) for _ in range(n_users)]
    tail = m.long_tail_items(popularity, 0.2)
    head_set, tail_set = set(np.flatnonzero(~tail)), set(np.flatnonzero(tail))
    # Elliot's PopRSP over Python sets.
    num = np.zeros(2)
    den = np.zeros(2)
    for row, s in zip(top_k, seen, strict=True):
        rec, s = set(row.tolist()), set(s.tolist())
        num += (len(rec & head_set), len(rec & tail_set))
        den += (len(head_set - s), len(tail_set - s))
    rate = num / den
    assert m.popularity_rsp(top_k, tail, seen) == pytest.approx(rate.std() / rate.mean())
    counts = {i: sum(i in row for row in top_k.tolist()) for i in range(n_items)}
    p = np.array([c for c in counts.values() if c]) / (n_users * k)
    assert m.shannon_entropy(m.exposure_counts(top_k, n_items)) == pytest.approx(
        -(p * np.log(p)).sum()
    )
    arp = np.mean([np.mean([popularity[i] for i in row]) for row in top_k.tolist()])
    assert m.average_popularity(top_k, popularity) == pytest.approx(arp)
    aplt = np.mean([len(set(row) & tail_set) / k for row in top_k.tolist()])
    assert m.average_long_tail_share(top_k, tail) == pytest.approx(aplt)
    # Tail: the least popular items whose interactions add up to at most 20 %.
    order = sorted(range(n_items), key=lambda i: (popularity[i], i))
    total, brute_tail = 0, set()
    for i in order:
        total += popularity[i]
        if total > 0.2 * popularity.sum():
            break
        brute_tail.add(i)
    assert tail_set == brute_tail


@pytest.mark.parametrize("seed", range(3))
def test_calibration_matches_a_dictionary_reference(seed):
    rng = np.random.default_rng(seed)
    names = ["A", "B", "C", "D"]
    text = np.array(
        [" ".join(rng.choice(names, size=rng.integers(1, 3), replace=False)) for _ in range(15)],
        dtype=object,
    )
    genres, _ = m.genre_matrix(text)
    history, recommended = rng.choice(15, size=6), rng.choice(15, size=4, replace=False)

    def distribution(items):
        mass = {g: 0.0 for g in names}
        for i in items:
            for g in text[i].split():
                mass[g] += 1 / len(text[i].split())
        total = sum(mass.values())
        return {g: v / total for g, v in mass.items()}

    p, q = distribution(history), distribution(recommended)
    brute = sum(p[g] * math.log(p[g] / (0.99 * q[g] + 0.01 * p[g])) for g in names if p[g] > 0)
    assert m.calibration_kl(history, recommended, genres) == pytest.approx(brute)


def test_group_gap_matches_brute_force_and_its_interval_shrinks_with_group_size():
    rng = np.random.default_rng(0)
    groups = np.array(["x", "y", "z"], dtype=object)[rng.integers(0, 3, size=300)]
    values = rng.random(300) + (groups == "z") * 0.3
    gap = m.group_gap(values, groups, np.random.default_rng(1))
    means = {g: values[groups == g].mean() for g in ("x", "y", "z")}
    assert gap.gap == pytest.approx(max(means.values()) - min(means.values()))
    assert gap.best == "z" and gap.ci_low <= gap.gap <= gap.ci_high
    small = m.group_gap(values[:30], groups[:30], np.random.default_rng(1))
    assert small.ci_high - small.ci_low > gap.ci_high - gap.ci_low


# --- the audit on a real ranking ---------------------------------------------------------------


def _toy_population(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 30
    users, items, times = [], [], []
    for u in range(n_users):
        n = int(rng.integers(4, 15))
        users += [u] * n
        items += rng.choice(n_items, size=n, replace=False, p=_zipf(n_items)).tolist()
        times += list(range(n))
    genres = ["Drama", "Comedy", "Action", "Drama Comedy", "Horror"]
    dataset = InteractionDataset(
        name="toy",
        user_ids=np.array(users),
        item_ids=np.array(items),
        timestamps=np.array(times, dtype=float),
        ratings=None,
        raw_user_ids=np.arange(n_users).astype(str).astype(object),
        raw_item_ids=np.arange(n_items).astype(str).astype(object),
        item_features={"genres": np.array([genres[i % 5] for i in range(n_items)], dtype=object)},
        user_features={
            "gender": np.array(["M", "F"] * (n_users // 2), dtype=object),
            "age": np.array([str(18 + 3 * u) for u in range(n_users)], dtype=object),
        },
    )
    split = leave_one_out(dataset)
    scores = torch.from_numpy(rng.random((n_users, n_items)))
    return dataset, split, lambda batch, stage: scores[torch.from_numpy(batch)]


def _zipf(n: int) -> np.ndarray:
    w = 1 / np.arange(1, n + 1)
    return w / w.sum()


def _server_audit(config: AuditConfig, seed: int = 0):
    dataset, split, scorer = _toy_population(seed)
    context = AuditContext.build(dataset, split, config)
    result = evaluate(scorer, split, "test", EvalConfig(ks=(10,)), top_n=config.k)
    record = audit(result.per_user, result.top_items, context, config, np.random.default_rng(0))
    return dataset, split, scorer, context, result, record


def test_audit_record_holds_every_metric_and_group():
    *_, result, record = _server_audit(AuditConfig(min_group_size=1))
    assert sorted(record["groups"]) == ["activity", "age", "gender", "most-active"]
    assert set(record["groups"]["gender"]) == {"HR@10", "NDCG@10", "MRR"}
    assert record["items"]["coverage@10"] == pytest.approx(result.metrics["Coverage@10"])
    assert set(record["items"]) == {"coverage@10", "gini", "entropy", "arp", "aplt", "pop_rsp"}
    assert record["calibration"]["kl"] > 0 and record["breaches"] == []
    assert "<img" in audit_html([{"round": 1, **record}])


def test_federated_sums_reproduce_the_server_audit():
    config = AuditConfig()
    _dataset, split, scorer, context, _result, server = _server_audit(config)
    partitions = np.array_split(np.random.default_rng(3).permutation(split.num_users), 7)
    parts = []
    for users in partitions:
        groups = {a: labels[users] for a, labels in context.groups.items()}
        client = AuditContext.from_parts(
            split.subset(users),
            config,
            groups,
            context.popularity,
            _dataset.item_features.get("genres"),
        )
        scores = lambda batch, stage, users=users: scorer(users[batch], stage)  # noqa: E731
        mine = evaluate(scores, client.split, "test", EvalConfig(ks=(10,)), top_n=config.k)
        parts.append(
            client_sums(mine.per_user, mine.top_items, client, config, np.random.default_rng())
        )
    federated = audit_from_sums(add_sums(parts), context, config, np.random.default_rng(0))
    for key, value in server["items"].items():
        assert federated["items"][key] == pytest.approx(value), key
    assert federated["calibration"]["kl"] == pytest.approx(server["calibration"]["kl"])
    for attribute, by_metric in server["groups"].items():
        for metric, gap in by_metric.items():
            theirs = federated["groups"][attribute][metric]
            assert theirs["means"] == pytest.approx(gap["means"]) and theirs[
                "gap"
            ] == pytest.approx(gap["gap"])
            assert theirs["ci"][0] <= theirs["gap"] + 1e-12 <= theirs["ci"][1] + 1e-9


def test_exposure_noise_changes_only_the_histogram():
    config = AuditConfig(exposure_noise=2.0)
    _, _split, _, context, result, _ = _server_audit(config)
    noisy = client_sums(
        result.per_user, result.top_items, context, config, np.random.default_rng(0)
    )
    clean = client_sums(
        result.per_user, result.top_items, context, AuditConfig(), np.random.default_rng(0)
    )
    assert noisy["audit/exposure"] != clean["audit/exposure"]
    assert {k: v for k, v in noisy.items() if k != "audit/exposure"} == {
        k: v for k, v in clean.items() if k != "audit/exposure"
    }


def test_breaches_are_reported_and_small_groups_do_not_raise_them():
    strict = AuditConfig(min_coverage=1.01, max_gini=0.0, max_calibration_kl=0.0, min_aplt=1.0)
    *_, record = _server_audit(strict)
    found = breaches(record, strict)
    assert len(found) == 4 and any("coverage" in b and "min_coverage 1.01" in b for b in found)
    # A gap of 1.0 between two constant groups: CI [1, 1] breaches 0.5 …
    gap_record = {"groups": {"g": {"NDCG@10": {"gap": 1.0, "ci": [1.0, 1.0], "best": "a", "worst": "b"}}},
                  "items": {"coverage@10": 1.0, "gini": 0.0, "aplt": 1.0}}  # fmt: skip
    assert breaches(gap_record, AuditConfig(max_gap={"NDCG@10": 0.5}))
    # … a gap as large whose interval reaches below the threshold (a small group) does not.
    gap_record["groups"]["g"]["NDCG@10"]["ci"] = [0.2, 1.4]
    assert not breaches(gap_record, AuditConfig(max_gap={"NDCG@10": 0.5}))


# --- re-ranking ----------------------------------------------------------------------------------


def test_rerankers_at_lambda_zero_keep_the_model_order_and_move_towards_their_goal():
    config = AuditConfig()
    _dataset, split, scorer, context, result, base = _server_audit(config)
    assert context.genres is not None
    ev = EvalConfig(ks=(10,))
    same = evaluate(
        scorer,
        split,
        "test",
        ev,
        top_n=30,
        rerank=calibrated_reranker(split, context.genres, 10, 0.0),
    )
    np.testing.assert_array_equal(same.top_items[:, :10], result.top_items)
    np.testing.assert_array_equal(same.ranks, result.ranks)
    calibrated = evaluate(
        scorer,
        split,
        "test",
        ev,
        top_n=30,
        rerank=calibrated_reranker(split, context.genres, 10, 0.9),
    )
    record = audit(
        calibrated.per_user, calibrated.top_items, context, config, np.random.default_rng(0)
    )
    assert record["calibration"]["kl"] < base["calibration"]["kl"]
    # Personalised xQuAD moves each list's tail share towards the user's own: it raises
    # long-tail exposure of a popularity-biased model (as trained models are).
    noise = torch.from_numpy(np.random.default_rng(1).random((split.num_users, split.num_items)))
    popular = popularity_scorer(split)

    def biased(batch, stage):
        return popular(batch, stage) + 0.01 * noise[torch.from_numpy(batch)]

    rerank = long_tail_reranker(split, context.tail, 10, 0.9)
    aplt = [
        audit(r.per_user, r.top_items, context, config, np.random.default_rng(0))["items"]["aplt"]
        for r in (
            evaluate(biased, split, "test", ev, top_n=30),
            evaluate(biased, split, "test", ev, top_n=30, rerank=rerank),
        )
    ]
    assert aplt[1] > aplt[0]


def test_reranked_target_ranks_follow_the_new_list():
    _, split, scorer, *_ = _server_audit(AuditConfig())

    def reverse(users, stage, items, scores):
        return items[:, ::-1].copy()

    plain = evaluate(scorer, split, "test", EvalConfig(ks=(10,)), top_n=12)
    flipped = evaluate(scorer, split, "test", EvalConfig(ks=(10,)), top_n=12, rerank=reverse)
    inside = plain.ranks <= 12
    np.testing.assert_array_equal(flipped.ranks[inside], 13 - plain.ranks[inside])
    np.testing.assert_array_equal(flipped.ranks[~inside], plain.ranks[~inside])


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match=r"audit\.mode"):
        AuditConfig(mode="client")
    with pytest.raises(ValueError, match="max_gap names metrics"):
        AuditConfig(max_gap={"HR@5": 0.1})
    with pytest.raises(ValueError, match="top_n"):
        AuditConfig(rerank=RerankConfig(top_n=5))
    with pytest.raises(ValueError, match=r"rerank\.method"):
        RerankConfig(method="mmr")


def test_in_process_run_audits_every_evaluated_round_and_the_cli_rewrites_the_report(tmp_path):
    config = parse_config(
        {
            "data": {
                "source": "synthetic",
                "synthetic": {"num_users": 30, "num_items": 40, "seed": 0},
            },
            "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
            "evaluation": {"ks": [10]},
            "federated": {"num_rounds": 3, "clients_per_round": 5},
            "audit": {"max_gap": {"NDCG@10": 0.0}},
        }
    )
    run_inprocess(population_of(config), tmp_path, eval_every=1, progress=False)
    audits = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["round"] for a in audits] == [1, 2, 3]
    assert all(a["mode"] == "server" and a["seconds"] > 0 for a in audits)
    (tmp_path / "audit.html").unlink()
    result = CliRunner().invoke(app, ["audit-report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "<img" in (tmp_path / "audit.html").read_text()
    missing = CliRunner().invoke(app, ["audit-report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no audit log" in missing.output


@pytest.mark.parametrize("seed", range(4))
def test_many_small_groups_from_one_distribution_keep_the_interval_low(seed):
    # 20 groups of 10 users, all alike: max − min of the group means is large by chance; the
    # basic bootstrap interval corrects that bias, so its lower end stays far below the gap.
    rng = np.random.default_rng(seed)
    values = (rng.random(200) < 0.1).astype(float)
    groups = np.repeat(np.arange(20).astype(str), 10).astype(object)
    gap = m.group_gap(values, groups, np.random.default_rng(seed))
    assert gap.gap >= 0.2 and gap.ci_low <= gap.gap / 2


def test_groups_below_the_minimum_size_are_reported_not_compared():
    # One user with HR 1 would otherwise make a zero-width interval at gap 1.0: a false alarm.
    values = np.array([1.0] + [0.0] * 205)
    groups = np.array(["a"] + ["b"] * 200 + ["c"] * 5, dtype=object)
    gap = m.group_gap(values, groups, np.random.default_rng(0), min_size=10)
    assert gap is None  # only "b" is large enough
    groups[1:101] = "d"
    gap = m.group_gap(values, groups, np.random.default_rng(0), min_size=10)
    assert gap is not None and gap.small == {"a": 1, "c": 5} and set(gap.means) == {"b", "d"}


def test_reranking_keeps_pessimistic_ranks_under_ties():
    """A constant scorer earns nothing; a λ = 0 re-ranker must not change that."""
    _, split, *_ = _server_audit(AuditConfig())

    def constant(batch, stage):
        return torch.zeros(len(batch), split.num_items, dtype=torch.float64)

    ev = EvalConfig(ks=(10,))
    plain = evaluate(constant, split, "test", ev, top_n=20)
    same = evaluate(
        constant,
        split,
        "test",
        ev,
        top_n=20,
        rerank=long_tail_reranker(split, np.zeros(split.num_items, bool), 10, 0.0),
    )
    np.testing.assert_array_equal(same.ranks, plain.ranks)
    assert same.metrics["HR@10"] == plain.metrics["HR@10"] == 0.0


def test_noisy_exposure_does_not_make_unshown_items_look_covered():
    config = AuditConfig(exposure_noise=1.0)
    _, _, _, context, result, server = _server_audit(config)
    parts = [
        client_sums(result.per_user, result.top_items, context, config, np.random.default_rng(s))
        for s in range(20)
    ]
    noisy = audit_from_sums(add_sums(parts), context, config, np.random.default_rng(0))
    # 20 copies of the same lists: the same items are shown; noise alone must not add items.
    assert noisy["items"]["coverage@10"] <= server["items"]["coverage@10"] + 1e-9
    assert noisy["items"]["coverage@10"] >= 0.8 * server["items"]["coverage@10"]
