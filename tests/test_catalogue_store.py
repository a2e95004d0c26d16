"""The device-shaped data interface: a client splits its own events against the catalogue."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest

from fedrec.data import DataConfig, SyntheticConfig, prepare_split
from fedrec.data.catalogue import CATALOGUE_FORMAT, ItemCatalogue
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit
from fedrec.data.store import EventStore, RawEvents, client_split, partition_events
from fedrec.errors import FedrecDataError
from fedrec.semantic_id.content import item_texts


@pytest.fixture(scope="module")
def data() -> tuple[InteractionDataset, SequenceSplit]:
    config = DataConfig(
        synthetic=SyntheticConfig(num_users=60, num_items=60, mean_length=12, max_length=30, seed=5)
    )
    return prepare_split(config)


@pytest.fixture(scope="module")
def catalogue(data: tuple[InteractionDataset, SequenceSplit]) -> ItemCatalogue:
    dataset, split = data
    codes = np.arange(dataset.num_items * 3).reshape(-1, 3) % 7
    return ItemCatalogue.from_dataset(
        dataset, popularity=split.train_item_counts(), codes=codes, revision=4
    )


def assert_same_split(got: SequenceSplit, want: SequenceSplit) -> None:
    assert got.num_users == want.num_users
    assert got.num_items == want.num_items
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.timestamps, want.timestamps)
    assert (
        got.items.dtype == np.int64 and got.timestamps.dtype == want.timestamps.dtype == np.float64
    )


# ---- catalogue ---------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, catalogue: ItemCatalogue) -> None:
    path = tmp_path / "pub" / "catalogue.json"
    catalogue.save(path)
    loaded = ItemCatalogue.load(path)
    assert loaded == catalogue
    assert loaded.content_hash == catalogue.content_hash
    assert loaded.revision == 4 and loaded.codes is not None and len(loaded.codes[0]) == 3
    assert json.loads(path.read_text(encoding="utf-8"))["format"] == CATALOGUE_FORMAT
    assert not list(path.parent.glob("*.tmp"))


def test_content_hash_changes_with_one_title(catalogue: ItemCatalogue) -> None:
    titles = list(catalogue.item_features["title"])
    titles[7] += "!"
    changed = ItemCatalogue(
        catalogue.raw_item_ids,
        {**catalogue.item_features, "title": tuple(titles)},
        catalogue.popularity,
        catalogue.codes,
        catalogue.revision,
    )
    assert changed.content_hash != catalogue.content_hash
    same = ItemCatalogue(
        catalogue.raw_item_ids,
        dict(catalogue.item_features),
        catalogue.popularity,
        catalogue.codes,
        catalogue.revision,
    )
    assert same.content_hash == catalogue.content_hash
    bumped = ItemCatalogue(catalogue.raw_item_ids, dict(catalogue.item_features), revision=5)
    assert bumped.content_hash != ItemCatalogue(catalogue.raw_item_ids, {}).content_hash


def test_tampered_catalogue_is_refused(tmp_path: Path, catalogue: ItemCatalogue) -> None:
    path = tmp_path / "catalogue.json"
    catalogue.save(path)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["raw_item_ids"][3] = "evil"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(FedrecDataError, match="modified or truncated") as err:
        ItemCatalogue.load(path)
    assert err.value.path == str(path) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "fedrec-catalogue/0"}', "fedrec-catalogue/0"),
        ("[1, 2]", "format"),
        ('{"format": "fedrec-catalogue/1", "raw_item_ids": [', "not valid JSON"),
        ('{"format": "fedrec-catalogue/1"}', "lacks"),
    ],
)
def test_bad_catalogue_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "catalogue.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FedrecDataError, match=message) as err:
        ItemCatalogue.load(path)
    assert err.value.path == str(path)


def test_missing_catalogue_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FedrecDataError, match="not found") as err:
        ItemCatalogue.load(tmp_path / "nope.json")
    assert err.value.path == str(tmp_path / "nope.json")


def test_catalogue_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="title"):
        ItemCatalogue(("a", "b"), {"title": ("x",)})
    with pytest.raises(ValueError, match="popularity"):
        ItemCatalogue(("a", "b"), {}, popularity=(1,))
    with pytest.raises(ValueError, match="codes"):
        ItemCatalogue(("a", "b"), {}, codes=((1, 2),))
    with pytest.raises(ValueError, match="duplicate"):
        ItemCatalogue(("a", "b", "a"), {})


def test_catalogue_tables_are_read_only(catalogue: ItemCatalogue) -> None:
    with pytest.raises(TypeError):
        catalogue.item_features["title"] = ()  # type: ignore[index]
    with pytest.raises(AttributeError):
        catalogue.revision = 9  # type: ignore[misc]


def test_map_items_against_a_dict_oracle(catalogue: ItemCatalogue) -> None:
    rng = np.random.default_rng(0)
    raw = [*catalogue.raw_item_ids, "unknown", "i99999", ""]
    queries = np.array([raw[j] for j in rng.integers(len(raw), size=200)], dtype=object)
    oracle = {r: i for i, r in enumerate(catalogue.raw_item_ids)}
    indices, known = catalogue.map_items(queries)
    assert indices.dtype == np.int64 and known.dtype == bool
    assert indices.tolist() == [oracle.get(q, -1) for q in queries]
    assert known.tolist() == [q in oracle for q in queries]
    assert (~known).any() and known.any()
    assert catalogue.map_items([])[0].shape == (0,)


def test_item_texts_match_the_semantic_id_encoder(
    data: tuple[InteractionDataset, SequenceSplit], catalogue: ItemCatalogue
) -> None:
    assert catalogue.item_texts() == item_texts(data[0])


# ---- client split ------------------------------------------------------------------------


@pytest.mark.parametrize("wanted", [[0], [17], [-1], [5, 3, 22, 11, 20], "all"])
def test_client_split_equals_the_partition(
    data: tuple[InteractionDataset, SequenceSplit],
    catalogue: ItemCatalogue,
    wanted: list[int] | str,
) -> None:
    dataset, split = data
    everyone = list(range(split.num_users))
    users = everyone if isinstance(wanted, str) else [everyone[u] for u in wanted]
    result = client_split(partition_events(dataset, split, users), catalogue)
    assert_same_split(result.split, split.subset(np.array(users)))
    assert result.users == tuple(dataset.raw_user_ids[users].tolist())
    assert result.skipped_events == 0 and result.dropped_users == ()


def test_client_split_random_shuffled_users(
    data: tuple[InteractionDataset, SequenceSplit], catalogue: ItemCatalogue
) -> None:
    dataset, split = data
    rng = np.random.default_rng(1)
    for _ in range(5):
        users = rng.choice(split.num_users, size=5, replace=False)
        result = client_split(partition_events(dataset, split, users), catalogue)
        assert_same_split(result.split, split.subset(users))


def test_client_split_sorts_by_time_and_keeps_ties_in_store_order() -> None:
    catalogue = ItemCatalogue(tuple(f"i{i}" for i in range(6)), {})
    events = RawEvents(
        users=np.array(["b", "a", "b", "a", "b", "a", "b"]),
        items=np.array(["i5", "i0", "i4", "i1", "i3", "i2", "i2"]),
        timestamps=np.array([30, 3, 10, 1, 10, 2, 5]),
    )
    result = client_split(events, catalogue)
    assert result.users == ("b", "a")  # first appearance
    assert result.split.offsets.tolist() == [0, 4, 7]
    # b: t=5 i2, t=10 i4 then i3 (store order), t=30 i5; a: t=1 i1, t=2 i2, t=3 i0
    assert result.split.items.tolist() == [2, 4, 3, 5, 1, 2, 0]
    assert result.split.timestamps.tolist() == [5, 10, 10, 30, 1, 2, 3]


def test_unknown_items_are_skipped_with_one_warning(
    data: tuple[InteractionDataset, SequenceSplit],
    catalogue: ItemCatalogue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset, split = data
    users = np.array([4, 9])
    events = partition_events(dataset, split, users)
    user = dataset.raw_user_ids[9]
    stale = RawEvents(
        users=np.concatenate([[user, dataset.raw_user_ids[4], user], events.users]),
        items=np.concatenate([["brand-new"] * 3, events.items]),
        timestamps=np.concatenate([events.timestamps[:3], events.timestamps]),
    )
    with caplog.at_level(logging.WARNING, logger="fedrec.data.store"):
        result = client_split(stale, catalogue)
    assert result.skipped_events == 3
    warnings = [r for r in caplog.records if r.name == "fedrec.data.store"]
    assert len(warnings) == 1
    assert "3 event(s) of 1 distinct item(s)" in warnings[0].getMessage()
    assert "revision 4" in warnings[0].getMessage()
    # The unknown events came first, but user order is still first appearance of the user.
    assert result.users == (dataset.raw_user_ids[9], dataset.raw_user_ids[4])
    assert_same_split(result.split, split.subset(np.array([9, 4])))


def test_short_users_are_dropped_and_named(
    data: tuple[InteractionDataset, SequenceSplit],
    catalogue: ItemCatalogue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset, split = data
    events = partition_events(dataset, split, [2, 6])
    short = RawEvents(
        users=np.concatenate([events.users, ["newcomer", "newcomer", "ghost"]]),
        items=np.concatenate([events.items, ["i0", "i1", "unknown-only"]]),
        timestamps=np.concatenate([events.timestamps, [1, 2, 3]]),
    )
    with caplog.at_level(logging.WARNING, logger="fedrec.data.store"):
        result = client_split(short, catalogue)
    assert result.dropped_users == ("newcomer", "ghost")
    assert result.skipped_events == 1
    assert result.users == tuple(dataset.raw_user_ids[[2, 6]].tolist())
    assert_same_split(result.split, split.subset(np.array([2, 6])))
    assert any("newcomer" in r.getMessage() for r in caplog.records)


def test_empty_events_give_an_empty_split(catalogue: ItemCatalogue) -> None:
    result = client_split(RawEvents(np.array([]), np.array([]), np.array([])), catalogue)
    assert result.split.num_users == 0 and result.split.offsets.tolist() == [0]
    assert result.users == () and result.skipped_events == 0


def test_raw_events_validate() -> None:
    with pytest.raises(ValueError, match="items"):
        RawEvents(np.array(["a", "b"]), np.array(["i"]), np.array([1, 2]))
    with pytest.raises(ValueError, match="whole numbers"):
        RawEvents(np.array(["a"]), np.array(["i"]), np.array([1.5]))
    assert RawEvents(np.array(["a"]), np.array(["i"]), np.array([7.0])).timestamps.dtype == np.int64


def test_partition_events_refuses_a_repeated_user(
    data: tuple[InteractionDataset, SequenceSplit],
) -> None:
    with pytest.raises(ValueError, match="twice"):
        partition_events(*data, [3, 3])


# ---- event store -------------------------------------------------------------------------


def test_event_store_round_trip_is_private(
    tmp_path: Path, data: tuple[InteractionDataset, SequenceSplit], catalogue: ItemCatalogue
) -> None:
    dataset, split = data
    users = np.array([8, 1, 13])
    events = partition_events(dataset, split, users)
    attributes = {
        str(dataset.raw_user_ids[u]): {k: str(v[u]) for k, v in dataset.user_features.items()}
        for u in users
    }
    folder = tmp_path / "clients" / "c0"
    store = EventStore.write(folder, events, attributes)
    read = EventStore(folder).events()
    assert read.users.tolist() == events.users.tolist()
    assert read.items.tolist() == events.items.tolist()
    np.testing.assert_array_equal(read.timestamps, events.timestamps)
    assert store.user_attributes() == attributes
    assert_same_split(client_split(read, catalogue).split, split.subset(users))
    for name in (EventStore.EVENTS, EventStore.USERS):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["events.json", "users.json"]


def test_event_store_errors_name_the_file(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "empty")
    with pytest.raises(FedrecDataError, match="missing") as err:
        store.events()
    assert err.value.path == str(tmp_path / "empty" / "events.json")
    folder = tmp_path / "c1"
    EventStore.write(folder, RawEvents(np.array(["u"]), np.array(["i"]), np.array([1])), {})
    (folder / "events.json").write_text('{"format": "fedrec-events/1", "users": [', "utf-8")
    with pytest.raises(FedrecDataError, match="corrupt") as err:
        EventStore(folder).events()
    assert err.value.path == str(folder / "events.json")
    (folder / "events.json").write_text(
        '{"format": "fedrec-events/1", "users": ["u"], "items": [], "timestamps": [1]}', "utf-8"
    )
    with pytest.raises(FedrecDataError, match="malformed"):
        EventStore(folder).events()
