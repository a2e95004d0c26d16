"""The synthetic default: deterministic, group tastes differ, sequential signal, scales."""

import numpy as np
import pytest
import torch

from fedrec.data import SyntheticConfig, generate_synthetic, leave_one_out, preprocess
from fedrec.data.preprocess import PreprocessConfig
from fedrec.evaluation import EvalConfig, evaluate, popularity_scorer


def test_same_seed_same_data_other_seed_other_data():
    a = generate_synthetic(SyntheticConfig(num_users=200, num_items=100, seed=5))
    b = generate_synthetic(SyntheticConfig(num_users=200, num_items=100, seed=5))
    c = generate_synthetic(SyntheticConfig(num_users=200, num_items=100, seed=6))
    for field in ("user_ids", "item_ids", "timestamps"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.item_ids[:500], c.item_ids[:500])
    assert list(a.item_features["title"]) == list(b.item_features["title"])


def test_catalog_and_user_attributes_are_present():
    ds = generate_synthetic(SyntheticConfig(num_users=300, num_items=150))
    assert set(ds.item_features) == {"title", "genres", "year"}
    assert set(ds.user_features) == {"gender", "age"}
    assert len(set(ds.item_features["title"])) == ds.num_items  # titles are unique
    assert set(ds.user_features["gender"]) == {"F", "M"}
    lengths = np.bincount(ds.user_ids)
    assert lengths.min() >= 5 and lengths.max() <= 200
    timestamps_sorted = all(np.all(np.diff(ds.timestamps[ds.user_ids == u]) > 0) for u in range(20))
    assert timestamps_sorted


def genre_histogram(ds, users_mask):
    genres = sorted({g for text in ds.item_features["genres"] for g in text.split()})
    primary = np.array([genres.index(text.split()[0]) for text in ds.item_features["genres"]])
    rows = users_mask[ds.user_ids]
    hist = np.bincount(primary[ds.item_ids[rows]], minlength=len(genres)).astype(float)
    return hist / hist.sum()


@pytest.mark.parametrize(("attribute", "a", "b"), [("gender", "F", "M"), ("age", "18-24", "50+")])
def test_groups_have_different_tastes(attribute, a, b):
    ds = generate_synthetic(SyntheticConfig(num_users=3000, num_items=500, seed=1))
    column = ds.user_features[attribute]
    distance = (
        0.5 * np.abs(genre_histogram(ds, column == a) - genre_histogram(ds, column == b)).sum()
    )
    assert distance > 0.1  # total variation distance between the groups' genre mixes


def test_sequences_carry_signal_beyond_popularity():
    """A first-order transition count model (a brute-force oracle of sequential signal) beats popularity."""
    split = leave_one_out(
        preprocess(
            generate_synthetic(SyntheticConfig(num_users=2000, num_items=500)), PreprocessConfig()
        )
    )
    transitions = np.zeros((split.num_items, split.num_items))
    for user in range(split.num_users):
        items = split.history(user, "test")[0]
        np.add.at(transitions, (items[:-1], items[1:]), 1)

    def markov(users, stage):
        last = np.array([split.history(u, stage)[0][-1] for u in users])
        return torch.from_numpy(transitions[last])

    config = EvalConfig(ks=(10,))
    sequential = evaluate(markov, split, "test", config).metrics["NDCG@10"]
    popular = evaluate(popularity_scorer(split), split, "test", config).metrics["NDCG@10"]
    assert sequential > 2 * popular


def test_scales_to_a_hundred_thousand_users():
    ds = generate_synthetic(SyntheticConfig(num_users=100_000, num_items=20_000))
    assert ds.num_users == 100_000
    assert 3_000_000 < ds.num_interactions < 5_000_000
    assert ds.item_ids.dtype == np.int64 and ds.item_ids.nbytes < 50_000_000


def test_config_validation():
    with pytest.raises(ValueError, match="num_genres"):
        SyntheticConfig(num_genres=99)
    with pytest.raises(ValueError, match="mean_length"):
        SyntheticConfig(min_length=10, mean_length=5)
    with pytest.raises(ValueError, match="sequential_strength"):
        SyntheticConfig(sequential_strength=1.5)


def _recbole_catalogue(folder, items: int = 120):
    """A RecBole folder: titles, genres of very different sizes (Drama on every other item,
    Western on three), and interactions making item 0 the most watched."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    genres = ["Drama Romance" if i % 2 else "Comedy" for i in range(items)]
    genres[:3] = ["Drama Western"] * 3
    rows = [f"{i}\tFilm {i}\t{1950 + i % 50}\t{g}" for i, g in enumerate(genres)]
    (folder / f"{folder.name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "\n".join(rows)
        + "\n"
    )
    watched = np.concatenate(
        [np.zeros(200, dtype=int), np.arange(items), rng.integers(items, size=400)]
    )
    inter = [f"{n % 30}\t{i}\t{n}" for n, i in enumerate(watched)]
    (folder / f"{folder.name}.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(inter) + "\n"
    )


def test_synthetic_users_over_a_real_catalogue(tmp_path):
    from fedrec.data import DataConfig, load_dataset

    folder = tmp_path / "cat"
    _recbole_catalogue(folder)
    config = SyntheticConfig(num_users=3000, mean_length=12, max_length=22, catalogue=str(folder))
    ds = load_dataset(DataConfig(synthetic=config))
    assert ds.num_users == 3000 and ds.num_items == 120 and ds.name == "synthetic-cat"
    titles = dict(zip(ds.raw_item_ids, ds.item_features["title"], strict=True))
    assert titles["7"] == "Film 7" and set(ds.item_features) == {"title", "year", "genres"}
    counts = np.bincount(ds.item_ids, minlength=ds.num_items)
    assert counts.argmax() == list(ds.raw_item_ids).index("0")  # the catalogue's most watched
    # The most specific genre is primary: Western (3 items) over Drama, Romance over Drama.
    from fedrec.data.loaders import load_recbole
    from fedrec.data.synthetic import _catalogue_items

    catalogue = load_recbole(folder)
    items = _catalogue_items(catalogue)
    primary = {
        raw: items.genres[g] for raw, g in zip(catalogue.raw_item_ids, items.primary, strict=True)
    }
    assert [primary[str(i)] for i in (0, 1, 2, 4)] == ["Western"] * 3 + ["Comedy"]
    assert primary["5"] == "Romance"  # Drama Romance: Romance has fewer items
    for attribute, a, b in (("gender", "F", "M"), ("age", "18-24", "50+")):
        column = ds.user_features[attribute]
        mixes = []
        for group in (a, b):
            rows = (column == group)[ds.user_ids]
            comedy = np.char.startswith(ds.item_features["genres"].astype(str), "Comedy")
            mixes.append(comedy[ds.item_ids[rows]].mean())
        assert abs(mixes[0] - mixes[1]) > 0.02  # the groups' tastes differ on real genres
    same = load_dataset(DataConfig(synthetic=config))
    assert np.array_equal(same.item_ids, ds.item_ids)


def test_a_missing_catalogue_names_the_option(tmp_path):
    from fedrec.data import DataConfig, load_dataset
    from fedrec.errors import FedrecDataError

    config = SyntheticConfig(catalogue=str(tmp_path / "nowhere"))
    with pytest.raises(FedrecDataError, match=r"synthetic\.catalogue"):
        load_dataset(DataConfig(synthetic=config))
