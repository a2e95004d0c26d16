import numpy as np
import pytest

from fedrec.data import leave_one_out, preprocess
from fedrec.data.batching import history_batch, history_mask_indices, training_batch
from fedrec.data.preprocess import PreprocessConfig

from .conftest import make_dataset


def test_drop_duplicates_keeps_the_earliest_interaction():
    ds = make_dataset([(0, 1, 5.0), (0, 1, 2.0), (0, 2, 3.0), (0, 3, 4.0), (0, 4, 6.0)])
    out = preprocess(ds, PreprocessConfig(min_sequence_length=3))
    pairs = sorted(zip(out.raw_item_ids[out.item_ids], out.timestamps, strict=True))
    assert pairs == [("i1", 2.0), ("i2", 3.0), ("i3", 4.0), ("i4", 6.0)]


@pytest.mark.parametrize("in_order", [False, True])
def test_block_wise_deduplication_matches_a_per_user_reference(monkeypatch, in_order):
    """Blocks of 7 events (a user longer than a block doubles it), on data in file order and
    on data already sorted by user and time (no sort, and a split sharing the arrays)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("fedrec.data.preprocess"), "_DEDUPE_BLOCK", 7)
    rng = np.random.default_rng(3)
    rows = [
        (int(rng.integers(9)), int(rng.integers(6)), float(rng.integers(30))) for _ in range(300)
    ]
    rows += [(9, int(i), float(t)) for t, i in enumerate(rng.integers(12, size=40))]  # 40 events
    if in_order:
        rows = sorted(rows, key=lambda r: (r[0], r[2]))
    out = preprocess(make_dataset(rows), PreprocessConfig(min_sequence_length=3))
    split = leave_one_out(out)
    expected = {}
    for t, n, u, i in sorted((t, n, u, i) for n, (u, i, t) in enumerate(rows)):
        expected.setdefault(f"u{u}", {}).setdefault(f"i{i}", (t, n))  # the earliest
    expected = {u: sorted(items, key=items.get) for u, items in expected.items() if len(items) >= 3}
    got = {
        str(out.raw_user_ids[u]): [str(out.raw_item_ids[i]) for i in split.full(u)[0]]
        for u in range(split.num_users)
    }
    assert got == expected
    assert (split.items is out.item_ids) == in_order


def test_rating_threshold_and_min_length():
    rows = [(0, i, float(i)) for i in range(5)] + [(1, i, float(i)) for i in range(5)]
    ratings = [5, 5, 5, 1, 1, 5, 5, 5, 5, 4]  # user 0, then user 1
    out = preprocess(
        make_dataset(rows, ratings), PreprocessConfig(rating_threshold=4, min_sequence_length=4)
    )
    # user 0 keeps 3 items (< 4) and is dropped; user 1 keeps all 5
    assert list(out.raw_user_ids) == ["u1"]
    assert out.num_interactions == 5


def test_rating_threshold_without_ratings_is_an_error():
    with pytest.raises(ValueError, match="no ratings"):
        preprocess(make_dataset([(0, 0, 0.0)] * 3), PreprocessConfig(rating_threshold=3))


def test_k_core_is_iterated_to_a_fixed_point():
    rng = np.random.default_rng(0)
    rows = [
        (int(u), int(i), float(t))
        for t, (u, i) in enumerate(rng.integers(0, [40, 60], size=(500, 2)))
    ]
    out = preprocess(make_dataset(rows), PreprocessConfig(k_core=5, min_sequence_length=3))
    assert np.bincount(out.user_ids).min() >= 5
    assert np.bincount(out.item_ids).min() >= 5
    # ids stay dense after filtering
    assert out.user_ids.max() == out.num_users - 1 and out.item_ids.max() == out.num_items - 1


def test_preprocess_refuses_to_return_an_empty_data_set():
    with pytest.raises(ValueError, match="removed every interaction"):
        preprocess(
            make_dataset([(0, 0, 0.0), (0, 1, 1.0)]), PreprocessConfig(min_sequence_length=3)
        )


def test_leave_one_out_matches_a_per_user_reference():
    rng = np.random.default_rng(1)
    rows = [
        (int(rng.integers(6)), int(rng.integers(30)), float(rng.integers(20))) for _ in range(120)
    ]
    ds = preprocess(
        make_dataset(rows), PreprocessConfig(drop_duplicates=False, min_sequence_length=3)
    )
    split = leave_one_out(ds)
    for user in range(split.num_users):
        # reference: this user's rows sorted by time, ties in file order
        raw_user = int(ds.raw_user_ids[user][1:])
        mine = sorted((t, n, i) for n, (u, i, t) in enumerate(rows) if u == raw_user)
        sequence = [str(ds.raw_item_ids[i]) for i in split.full(user)[0]]
        assert sequence == [f"i{i}" for _, _, i in mine]
        assert split.targets("test")[user] == split.full(user)[0][-1]
        assert split.targets("valid")[user] == split.full(user)[0][-2]
        assert split.history(user, "test")[0].tolist() == split.full(user)[0][:-1].tolist()


@pytest.mark.parametrize("stage", ["valid", "test"])
def test_recent_keeps_each_users_last_events_and_their_targets(small_split, stage):
    recent = small_split.recent(3, stage)
    assert (recent.targets(stage) == small_split.targets(stage)).all()
    for user in range(small_split.num_users):
        items, times = small_split.history(user, stage)
        cut_items, cut_times = recent.history(user, stage)
        assert cut_items.tolist() == items[-3:].tolist()
        assert cut_times.tolist() == times[-3:].tolist()


@pytest.mark.parametrize("events", [0, 2, 5, 50])
def test_without_last_drops_each_users_last_events(small_split, events):
    cut = small_split.without_last(events)
    for user in range(small_split.num_users):
        items, times = small_split.full(user)
        assert cut.full(user)[0].tolist() == items[: max(len(items) - events, 0)].tolist()
        assert cut.full(user)[1].tolist() == times[: max(len(items) - events, 0)].tolist()


def test_without_training_items_removes_them_from_training_only(small_split):
    # The items of some users' validation and test targets, so that both cases are met.
    cold = np.unique(np.concatenate([small_split.targets("valid")[:3], [0, 1]]))
    cut = small_split.without_training_items(cold)
    for stage in ("valid", "test"):
        assert (cut.targets(stage) == small_split.targets(stage)).all()
    for user in range(small_split.num_users):
        items, times = small_split.full(user)
        keep = [k for k in range(len(items)) if k >= len(items) - 2 or items[k] not in cold]
        assert cut.full(user)[0].tolist() == items[keep].tolist()
        assert cut.full(user)[1].tolist() == times[keep].tolist()
        assert not np.isin(cut.train_sequence(user)[0], cold).any()
    assert not np.isin(cold, np.flatnonzero(cut.train_item_counts())).any()
    for user in range(3):  # a cold validation target is still the test history's last event
        assert cut.history(user, "test")[0][-1] == small_split.targets("valid")[user]


def test_split_ratings_follow_the_split_order_through_subsets_and_windows():
    rows = [(1, 5, 3.0), (0, 2, 9.0), (0, 1, 1.0), (1, 4, 1.0), (0, 3, 5.0), (1, 0, 2.0)]
    rated = {(u, i): 10.0 * u + i for u, i, _ in rows}
    ds = make_dataset(rows, ratings=[rated[(u, i)] for u, i, _ in rows])
    split = leave_one_out(ds)

    def expected(view, user: int, raw_user: int) -> list[float]:
        items = view.full(user)[0]
        return [rated[(raw_user, int(str(ds.raw_item_ids[i])[1:]))] for i in items]

    raw = [int(str(ds.raw_user_ids[u])[1:]) for u in range(split.num_users)]
    for view, users in ((split, range(split.num_users)), (split.without_last(1), range(2))):
        for user in users:
            lo, hi = view.offsets[user], view.offsets[user + 1]
            assert view.ratings[lo:hi].tolist() == expected(view, user, raw[user])
    one = split.subset(np.array([1]))
    assert one.ratings.tolist() == expected(one, 0, raw[1])
    assert leave_one_out(make_dataset(rows)).ratings is None


def test_leave_one_out_needs_three_interactions():
    with pytest.raises(ValueError, match="fewer than 3"):
        leave_one_out(make_dataset([(0, 0, 0.0), (0, 1, 1.0)]))


def test_training_batch_is_autoregressive_and_right_aligned(small_split):
    users = np.arange(5)
    inputs, times, targets = training_batch(small_split, users, max_len=8)
    for row, user in enumerate(users):
        train = small_split.train_sequence(user)[0] + 1
        window = train[-9:]
        n = len(window) - 1
        assert inputs[row, 8 - n :].tolist() == window[:-1].tolist()
        assert targets[row, 8 - n :].tolist() == window[1:].tolist()
        assert (inputs[row, : 8 - n] == 0).all() and (targets[row, : 8 - n] == 0).all()
        assert times[row, -1] == small_split.train_sequence(user)[1][-2]


def test_history_batch_includes_validation_item_only_for_test(small_split):
    users = np.arange(4)
    valid_items, _ = history_batch(small_split, users, "valid", max_len=50)
    test_items, _ = history_batch(small_split, users, "test", max_len=50)
    for row, user in enumerate(users):
        assert valid_items[row, -1] == small_split.train_sequence(user)[0][-1] + 1
        assert test_items[row, -1] == small_split.targets("valid")[user] + 1


def test_history_mask_indices_cover_exactly_the_visible_history(small_split):
    users = np.array([3, 0, 7])
    rows, items = history_mask_indices(small_split, users, "test")
    for row, user in enumerate(users):
        assert sorted(items[rows == row].tolist()) == sorted(
            small_split.history(user, "test")[0].tolist()
        )
