"""The recommendation funnel: its batched path against a one-user-at-a-time reference, its
first stage against full ranking, the ranker's features and labels, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.audits.metrics import genre_matrix, long_tail_items
from fedrec.audits.rerank import RERANKERS
from fedrec.data.batching import next_item_batch
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.split import SequenceSplit
from fedrec.evaluation import EvalConfig, evaluate
from fedrec.models.ranking import ranker_class
from fedrec.models.registry import build_model, model_config
from fedrec.serving.features import YEAR_BUCKETS, FeatureTables, year_bucket
from fedrec.serving.funnel import (
    RANKER_STAGE,
    RERANK_STAGE,
    Funnel,
    FunnelConfig,
    audit_reranker,
    merge_sources,
    recall_at_n,
    reference_funnel,
)
from fedrec.serving.ranker import candidate_labels, ranker_scorer, sequential_user_vectors
from fedrec.serving.sources import (
    SequentialEncoder,
    popularity_source,
    sequential_source,
    top_n_source,
)
from fedrec.training import model_scorer


def table_source(table: np.ndarray, n: int):
    scores = torch.from_numpy(table)
    return top_n_source(lambda visible, users: scores[users], n)


def with_a_cold_user(split: SequenceSplit) -> SequenceSplit:
    """``split`` (visible histories) with user 0's history emptied."""
    cut = split.offsets[1]
    return SequenceSplit(
        split.num_users,
        split.num_items,
        np.concatenate([[0, 0], split.offsets[2:] - cut]),
        split.items[cut:],
        split.timestamps[cut:],
    )


def test_visible_histories_are_each_stages_history(small_split):
    for stage in ("valid", "test"):
        visible = small_split.visible(stage)
        for user in (0, 7, small_split.num_users - 1):
            np.testing.assert_array_equal(
                visible.full(user)[0], small_split.history(user, stage)[0]
            )


def test_merge_keeps_each_item_once_at_its_first_source_and_cold_users_get_one_source():
    first = (np.array([[3, 1, -1], [2, 4, 5]]), np.array([[0.9, 0.5, 0.0], [0.3, 0.2, 0.1]]))
    second = (np.array([[1, 7, 8], [9, 2, 6]]), np.array([[10.0, 9.0, 8.0], [7.0, 6.0, 5.0]]))
    merged = merge_sources([first, second], cold=np.array([False, True]), cold_source=1)
    assert merged.items[0].tolist()[:4] == [3, 1, 7, 8]
    assert merged.source[0].tolist()[:4] == [0, 0, 1, 1]
    assert merged.found[0, 1].tolist() == [True, True]  # item 1: proposed by both
    assert merged.scores[0, 1].tolist() == [0.5, 10.0]
    assert merged.items[1].tolist()[:3] == [9, 2, 6] and (merged.items[1, 3:] == -1).all()
    assert (merged.source[1, :3] == 1).all()


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_a_loop_over_users_and_entries(seed):
    rng = np.random.default_rng(seed)
    batch, widths = 6, (5, 4, 7)
    proposals = []
    for width in widths:
        items = rng.integers(-1, 12, size=(batch, width))
        for row in items:  # a source proposes each item at most once
            seen: set[int] = set()
            for j, item in enumerate(row):
                row[j] = -1 if item in seen else item
                seen.add(int(item))
        proposals.append((items, rng.normal(size=(batch, width)).astype(np.float32)))
    cold = rng.random(batch) < 0.3
    merged = merge_sources(proposals, cold, cold_source=2)
    for row in range(batch):
        slot: dict[int, int] = {}
        first: dict[int, int] = {}
        for s, (items, values) in enumerate(proposals):
            if cold[row] and s != 2:
                continue
            for item, value in zip(items[row].tolist(), values[row].tolist(), strict=True):
                if item < 0:
                    continue
                at = slot.setdefault(item, len(slot))
                assert merged.items[row, at] == item
                assert merged.found[row, at, s] and merged.scores[row, at, s] == np.float32(value)
                first.setdefault(item, s)
        assert all(merged.source[row, slot[i]] == first[i] for i in slot)
        assert (merged.items[row, len(slot) :] == -1).all()
        assert merged.found[row].sum() == sum(
            int((p[0][row] >= 0).sum()) for s, p in enumerate(proposals) if not cold[row] or s == 2
        )


def _toy(small_split, seed=0):
    visible = with_a_cold_user(small_split.visible("test"))
    rng = np.random.default_rng(seed)
    tables = {name: rng.normal(size=(visible.num_users, visible.num_items)) for name in "ab"}
    counts = rng.integers(0, 50, size=visible.num_items)
    sources = {
        "a": table_source(tables["a"], 7),
        "b": table_source(tables["b"], 5),
        "popularity": popularity_source(counts, 6),
    }
    return visible, sources


@pytest.mark.parametrize("rank", [False, True])
def test_funnel_equals_the_reference_one_user_at_a_time(small_split, rank):
    visible, sources = _toy(small_split)
    config = FunnelConfig(sources=("a", "b", "popularity"), retrieve_n=7, rank=rank, k=9)
    tasks = ("like", "engage")
    item_logits = np.random.default_rng(1).normal(size=(visible.num_items, 2))

    def ranker(visible, users, attributes, candidates):
        return torch.from_numpy(item_logits[candidates.items.clip(0)])

    funnel = Funnel(config, sources, ranker, tasks)
    users = np.arange(visible.num_users)
    result = funnel(visible, users, np.zeros((len(users), 0)))
    for user in users:
        expected = reference_funnel(
            config, sources, visible, int(user), lambda item: item_logits[item], tasks
        )
        got = [
            (int(i), str(s))
            for i, s in zip(result.items[user], result.stages[user], strict=True)
            if i >= 0
        ]
        assert got == expected, user
    assert set(result.stages[0]) == {RANKER_STAGE if rank else "popularity", ""}  # 6 < k
    for user in users:
        history = set(visible.full(int(user))[0].tolist())
        assert not history & set(result.items[user].tolist())


def test_a_ranker_that_scores_nan_is_an_error_not_a_list(small_split):
    visible, sources = _toy(small_split)
    config = FunnelConfig(sources=("a", "popularity"), retrieve_n=5, rank=True)

    def broken(visible, users, attributes, candidates):
        return torch.full((*candidates.items.shape, 2), float("nan"))

    funnel = Funnel(config, sources, broken, ("like", "engage"))
    with pytest.raises(ValueError, match="NaN"):
        funnel(visible, np.arange(3), np.zeros((3, 0)))


def test_the_first_stage_alone_is_the_sequential_models_full_ranking(small_split):
    torch.manual_seed(0)
    params = dict(max_len=20, embedding_dim=8, num_blocks=1, num_heads=2, dropout=0.0)
    model = build_model("hstu", small_split.num_items, model_config("hstu", params)).eval()
    cpu = torch.device("cpu")
    full = evaluate(
        model_scorer(model, small_split, cpu), small_split, "test", EvalConfig(ks=(10,)), top_n=10
    )
    config = FunnelConfig(sources=("hstu", "popularity"), retrieve_n=10, rank=False, k=10)
    sources = {
        "hstu": sequential_source(SequentialEncoder(model, cpu), 10),
        "popularity": popularity_source(small_split.train_item_counts(), 10),
    }
    users = np.arange(small_split.num_users)
    result = Funnel(config, sources)(small_split.visible("test"), users, np.zeros((len(users), 0)))
    np.testing.assert_array_equal(result.items, full.top_items)
    recall = recall_at_n(result.candidates, small_split.targets("test"))
    assert recall["source:0"] == pytest.approx(full.metrics["HR@10"])
    assert recall["union"] >= recall["source:0"]


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_encoding_groups_of_similar_length_equals_padding_every_history_to_max_len(
    small_split, name
):
    torch.manual_seed(0)
    params = dict(max_len=12, embedding_dim=8, num_blocks=2, num_heads=2, dropout=0.0)
    model = build_model(name, small_split.num_items, model_config(name, params)).eval()
    visible = small_split.visible("test")
    users = np.random.default_rng(0).permutation(visible.num_users)
    lengths = np.diff(visible.offsets)[users]
    assert lengths.min() < 6 and lengths.max() > 12  # short ones, and ones cut by max_len
    grouped = SequentialEncoder(model, torch.device("cpu"), group=4)(visible, users)
    with torch.no_grad():
        whole = model.user_vectors(*next_item_batch(visible, users, 12))
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)


def test_a_reranker_reorders_and_names_its_stage(small_split):
    visible, sources = _toy(small_split)
    config = FunnelConfig(
        sources=("a", "popularity"), retrieve_n=6, rank=False, rerank="calibrated", k=4
    )

    def reverse(visible, users, items, scores):  # the listed items reversed, pads last
        out = items.copy()
        for row in out:
            listed = row[row >= 0]
            row[: len(listed)] = listed[::-1]
        return out

    funnel = Funnel(config, sources, reranker=reverse)
    users = np.arange(3)
    plain = Funnel(
        FunnelConfig(sources=("a", "popularity"), retrieve_n=6, rank=False, k=12), sources
    )
    full = plain(visible, users, np.zeros((3, 0)))
    result = funnel(visible, users, np.zeros((3, 0)))
    width = (full.items[1] >= 0).sum()
    assert result.items[1].tolist() == full.items[1, :width][::-1][:4].tolist()
    assert RERANK_STAGE in set(result.stages[1])


@pytest.mark.parametrize("method", ["calibrated", "long-tail"])
def test_the_funnels_reranking_is_the_audits_on_the_same_histories(small_split, method):
    rng = np.random.default_rng(0)
    names = np.array(["Drama", "Comedy", "Horror", "Western"])
    genres = [
        " ".join(rng.choice(names, size=rng.integers(1, 3), replace=False))
        for _ in range(small_split.num_items)
    ]
    counts = small_split.train_item_counts()
    catalogue = ItemCatalogue(
        raw_item_ids=tuple(f"i{i}" for i in range(small_split.num_items)),
        item_features={"genres": tuple(genres)},
        popularity=tuple(int(c) for c in counts),
    )
    config = FunnelConfig(
        sources=("popularity",), retrieve_n=20, rank=False, rerank=method, rerank_lambda=0.7, k=5
    )
    visible = small_split.visible("test")
    users = np.arange(small_split.num_users)
    random_scores = table_source(rng.normal(size=(len(users), small_split.num_items)), 20)
    plain = Funnel(
        FunnelConfig(sources=("popularity",), retrieve_n=20, rank=False, k=20),
        {"popularity": random_scores},  # lists that mix head and tail, and genres
    )
    listed = plain(visible, users, np.zeros((len(users), 0)))
    got = audit_reranker(config, catalogue)(visible, users, listed.items, listed.scores)
    table = genre_matrix(np.array(genres))[0] if method == "calibrated" else long_tail_items(counts)
    expected = RERANKERS[method](small_split, table, 5, 0.7)(
        users, "test", listed.items, listed.scores
    )
    np.testing.assert_array_equal(got, expected)
    assert (got != listed.items).any()  # it did reorder


def catalogue_and_tables():
    catalogue = ItemCatalogue(
        raw_item_ids=("a", "b", "c"),
        item_features={"genres": ("Drama", "Comedy Drama", ""), "year": ("1994", "1921", "")},
        popularity=(10, 0, 3),
        codes=((0, 1), (2, 0), (1, 1)),
    )
    users = {"age": ["24", "61"], "gender": ["F", "M"], "occupation": ["writer"]}
    return catalogue, FeatureTables.build(catalogue, users)


def test_feature_tables_from_the_catalogue_and_unknown_user_values():
    _, tables = catalogue_and_tables()
    assert tables.genres.tolist() == [[0, 1], [1, 1], [0, 0]]  # Comedy, Drama
    assert tables.year.tolist() == [year_bucket("1994"), 1, 0]
    assert YEAR_BUCKETS[year_bucket("1994")] == "1990s"
    assert tables.code_sizes == (3, 2)
    assert tables.log_popularity[0] == pytest.approx(1.0) and tables.log_popularity[1] == 0
    rows = tables.attributes([{"age": "30", "gender": "M", "occupation": "pilot"}, {}])
    assert rows[0, 0] == 0  # band 25-34 was never seen: unknown
    assert rows[0, 1] == tables.vocabularies[1].index("M") and rows[0, 2] == 0
    assert (rows[1] == 0).all()


def test_ranker_scores_the_funnels_candidates_and_labels_follow_the_target():
    _, tables = catalogue_and_tables()
    candidates = merge_sources(
        [(np.array([[0, 2], [1, -1]]), np.array([[0.5, 0.1], [0.2, 0.0]]))],
        cold=np.array([False, False]),
        cold_source=0,
    )
    labels = candidate_labels(
        candidates, np.array([2, 1]), np.array([5.0, 3.0]), ("engage", "like")
    )
    assert labels[..., 0].tolist() == [[0, 1], [1, 0]]
    assert labels[..., 1].tolist() == [[0, 1], [0, 0]]
    with pytest.raises(ValueError, match="ratings"):
        candidate_labels(candidates, np.array([2, 1]), None, ("like",))
    torch.manual_seed(0)
    ranker = ranker_class("mmoe-dcn")(tables.ranker_config(user_dim=3, sources=1)).eval()
    scorer = ranker_scorer(ranker, tables, lambda visible, users: torch.ones(len(users), 3))
    attributes = tables.attributes([{"gender": "F"}, {}])
    logits = scorer(None, np.arange(2), attributes, candidates)
    assert logits.shape == (2, 2, 2) and torch.isfinite(logits).all()
    # Row by row is the same as the batch.
    single = merge_sources(
        [(np.array([[1]]), np.array([[0.2]]))], cold=np.array([False]), cold_source=0
    )
    alone = scorer(None, np.arange(1), attributes[1:], single)
    torch.testing.assert_close(alone[0, 0], logits[1, 0])
    # Scoring in chunks of pairs (the cache-sized passes) is the same as one pass.
    chunked = ranker_scorer(
        ranker, tables, lambda visible, users: torch.ones(len(users), 3), chunk=3
    )(None, np.arange(2), attributes, candidates)
    torch.testing.assert_close(chunked, logits)


def test_user_vectors_of_empty_histories_are_zero(small_split):
    params = dict(max_len=20, embedding_dim=8, num_blocks=1, num_heads=2, dropout=0.0)
    model = build_model("hstu", small_split.num_items, model_config("hstu", params))
    visible = with_a_cold_user(small_split.visible("test"))
    encoder = SequentialEncoder(model, torch.device("cpu"))
    vectors = sequential_user_vectors(encoder)(visible, np.arange(3))
    assert (vectors[0] == 0).all() and vectors[1].abs().sum() > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sources": ()}, "one or more"),
        ({"sources": ("hstu", "hstu", "popularity")}, "distinct"),
        ({"sources": ("hstu",)}, "cold_start_source"),
        ({"k": 0}, ">= 1"),
        ({"retrieve_n": 2, "sources": ("popularity",), "k": 3}, "exceeds"),
        ({"task_weights": {"engage": -1.0}}, "non-negative"),
        ({"rerank": "fair"}, "one of"),
        ({"rerank": "calibrated", "rerank_lambda": 2.0}, "rerank_lambda"),
    ],
)
def test_bad_funnel_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        FunnelConfig(**options)


def test_a_funnel_refuses_missing_stages():
    with pytest.raises(ValueError, match="only"):
        Funnel(FunnelConfig(sources=("popularity",), rank=False), {})
    with pytest.raises(ValueError, match="no ranker"):
        Funnel(
            FunnelConfig(sources=("popularity",), rank=True),
            {"popularity": popularity_source(np.ones(3), 2)},
        )
