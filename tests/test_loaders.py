"""On-disk loaders: RecBole atomic files, GroupLens MovieLens, plain sequences, and bad input."""

from pathlib import Path

import numpy as np
import pytest

from fedrec.data import DataConfig, load_dataset
from fedrec.data.loaders import (
    ML100K_GENRES,
    load_movielens_1m,
    load_movielens_100k,
    load_recbole,
    load_sequences,
)
from fedrec.errors import FedrecDataError

ML100K_RECBOLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


# --- fixture files ---------------------------------------------------------------------------


def lines(*rows: str) -> str:
    return "".join(f"{row}\n" for row in rows)


def write_files(directory: Path, files: dict[str, str | bytes], encoding: str) -> Path:
    """Write ``{name: text or raw bytes}`` into ``directory`` (created) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode(encoding)
        (directory / name).write_bytes(data)
    return directory


def ml100k_item(item_id: int, title: str, date: str, genres: tuple[str, ...] = ()) -> str:
    """One ``u.item`` row: id|title|release date|video date|url|19 genre flags."""
    flags = ["1" if genre in genres else "0" for genre in ML100K_GENRES]
    return "|".join([str(item_id), title, date, "", "http://example.org/", *flags])


RECBOLE_FILES = {
    "toy.inter": lines(
        INTER_HEADER,
        "u7\ti3\t4\t300",
        "u2\ti1\t5\t100",
        "u7\ti1\t2\t200",
        "u2\ti9\t3\t400",
    ),
    "toy.item": lines(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "i1\tToy Story\t1995\tAnimation Comedy",
        "i3\tHeat\t1995\tAction Crime",
    ),
    "toy.user": lines(
        "user_id:token\tage:token\tgender:token",
        "u2\t53\tF",
        "u7\t24\tM",
    ),
}

ML100K_FILES = {
    "u.data": lines(
        "1\t10\t5\t881250949",
        "2\t20\t3\t881250950",
        "1\t30\t4\t881250951",
        "2\t10\t1\t881250952",
    ),
    "u.item": lines(
        ml100k_item(10, "Café Society (1995)", "01-Jan-1995", ("Comedy", "Drama")),
        ml100k_item(20, "Untitled", "12-Mar-1997", ("Action",)),
        ml100k_item(30, "Shadows (Cienie) (1988)", "01-Jan-1988"),
    ),
    "u.user": lines("1|24|M|technician|85711", "2|53|F|other|94043"),
}

ML1M_FILES = {
    "ratings.dat": lines(
        "1::1193::5::978300760",
        "1::661::3::978302109",
        "2::1193::4::978298413",
    ),
    "movies.dat": lines(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "661::Café au lait (1993)::Animation|Children's|Musical",
    ),
    "users.dat": lines("1::F::1::10::48067", "2::M::56::12::70072"),
}

SEQUENCE_FILES = {"seq.txt": lines("1 10 20 30", "2 30 10")}

# kind -> (default files, their encoding, loader taking the written folder)
KINDS = {
    "recbole": (RECBOLE_FILES, "utf-8", lambda d, **kw: load_recbole(d, name="toy", **kw)),
    "ml-100k": (ML100K_FILES, "latin-1", load_movielens_100k),
    "ml-1m": (ML1M_FILES, "latin-1", load_movielens_1m),
    "sequences": (SEQUENCE_FILES, "utf-8", lambda d, **kw: load_sequences(d / "seq.txt", **kw)),
}


def write_kind(tmp_path: Path, kind: str, **overrides: str | bytes) -> Path:
    """Write the default files of ``kind`` into ``tmp_path/toy``, with some replaced."""
    files, encoding, _ = KINDS[kind]
    return write_files(tmp_path / "toy", {**files, **overrides}, encoding)


def load_kind(tmp_path: Path, kind: str, overrides: dict[str, str | bytes], **kwargs):
    directory = write_kind(tmp_path, kind, **overrides)
    return KINDS[kind][2](directory, **kwargs)


def as_dict(keys: np.ndarray, values: np.ndarray) -> dict:
    return dict(zip(keys.tolist(), values.tolist(), strict=True))


def raw_pairs(ds) -> list[tuple[str, str]]:
    return list(zip(ds.raw_user_ids[ds.user_ids], ds.raw_item_ids[ds.item_ids], strict=True))


def assert_contiguous(ds) -> None:
    assert sorted(np.unique(ds.user_ids).tolist()) == list(range(ds.num_users))
    assert sorted(np.unique(ds.item_ids).tolist()) == list(range(ds.num_items))


# --- RecBole ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    not ML100K_RECBOLE.exists(), reason="MovieLens-100K is not at ../shared/data/ml-100k"
)
def test_recbole_movielens_100k():
    ds = load_recbole(ML100K_RECBOLE)
    assert ds.name == "ml-100k"
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    assert_contiguous(ds)
    assert ds.ratings is not None and set(np.unique(ds.ratings).tolist()) == {1, 2, 3, 4, 5}

    with (ML100K_RECBOLE / "ml-100k.inter").open(encoding="utf-8") as handle:
        next(handle)
        head = [next(handle).rstrip("\n").split("\t") for _ in range(50)]
    assert ds.raw_user_ids[ds.user_ids[:50]].tolist() == [row[0] for row in head]
    assert ds.raw_item_ids[ds.item_ids[:50]].tolist() == [row[1] for row in head]
    assert ds.timestamps[:50].tolist() == [float(row[3]) for row in head]

    assert {"title", "genres", "year"} <= set(ds.item_features)
    assert not {"movie_title", "class", "release_year"} & set(ds.item_features)
    toy_story = int(np.flatnonzero(ds.raw_item_ids == "1")[0])
    assert ds.item_features["title"][toy_story] == "Toy Story"
    assert ds.item_features["year"][toy_story] == "1995"
    assert "Animation" in ds.item_features["genres"][toy_story].split()
    assert all(len(ds.item_features["title"][i]) > 0 for i in range(ds.num_items))

    assert {"age", "gender", "occupation"} <= set(ds.user_features)
    assert set(ds.user_features["gender"].tolist()) == {"M", "F"}
    user_1 = int(np.flatnonzero(ds.raw_user_ids == "1")[0])
    assert ds.user_features["age"][user_1] == "24"
    assert ds.user_features["occupation"][user_1] == "technician"


def test_recbole_synthetic_files(tmp_path):
    directory = write_kind(tmp_path, "recbole")
    ds = load_recbole(directory)  # the name defaults to the folder's name
    assert ds.name == "toy"
    # ids in order of first appearance
    assert ds.raw_user_ids.tolist() == ["u7", "u2"]
    assert ds.raw_item_ids.tolist() == ["i3", "i1", "i9"]
    assert ds.user_ids.tolist() == [0, 1, 0, 1]
    assert ds.item_ids.tolist() == [0, 1, 1, 2]
    assert ds.ratings is not None and ds.ratings.tolist() == [4, 5, 2, 3]
    assert ds.timestamps.tolist() == [300, 100, 200, 400]
    # side tables are aliased, aligned with internal ids, '' where the table has no row
    assert set(ds.item_features) == {"title", "year", "genres"}
    assert as_dict(ds.raw_item_ids, ds.item_features["title"]) == {
        "i3": "Heat",
        "i1": "Toy Story",
        "i9": "",
    }
    assert as_dict(ds.raw_item_ids, ds.item_features["genres"])["i1"] == "Animation Comedy"
    assert as_dict(ds.raw_user_ids, ds.user_features["age"]) == {"u7": "24", "u2": "53"}
    assert as_dict(ds.raw_user_ids, ds.user_features["gender"]) == {"u7": "M", "u2": "F"}


def test_recbole_interactions_only_without_rating_or_timestamp(tmp_path):
    inter = lines("user_id:token\titem_id:token", "a\tx", "b\ty", "", "a\ty")
    directory = write_files(tmp_path / "other", {"other.inter": inter}, "utf-8")
    ds = load_recbole(directory)
    assert ds.ratings is None
    assert ds.timestamps.tolist() == [0.0, 1.0, 2.0]  # file order
    assert raw_pairs(ds) == [("a", "x"), ("b", "y"), ("a", "y")]
    assert ds.item_features == {} and ds.user_features == {}


def test_recbole_custom_field_names(tmp_path):
    inter = lines("uid:token\tiid:token\tts:float", "1\t5\t20", "1\t6\t10")
    directory = write_files(tmp_path / "d", {"x.inter": inter}, "utf-8")
    ds = load_recbole(directory, name="x", user_field="uid", item_field="iid", time_field="ts")
    assert raw_pairs(ds) == [("1", "5"), ("1", "6")]
    assert ds.timestamps.tolist() == [20.0, 10.0]


def test_recbole_missing_inter_file_points_at_data_dir(tmp_path):
    with pytest.raises(FedrecDataError, match="--data-dir") as info:
        load_recbole(tmp_path, name="absent")
    assert "absent.inter" in str(info.value)


def test_recbole_empty_inter_file(tmp_path):
    with pytest.raises(FedrecDataError, match="empty file") as info:
        load_kind(tmp_path, "recbole", {"toy.inter": ""})
    assert "toy.inter:1" in str(info.value)


# --- GroupLens MovieLens ---------------------------------------------------------------------


def test_movielens_100k_raw_files(tmp_path):
    ds = load_kind(tmp_path, "ml-100k", {})
    assert ds.name == "ml-100k"
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2, 3, 4)
    assert_contiguous(ds)
    assert raw_pairs(ds) == [("1", "10"), ("2", "20"), ("1", "30"), ("2", "10")]
    assert ds.ratings is not None and ds.ratings.tolist() == [5, 3, 4, 1]
    assert ds.timestamps.tolist() == [881250949, 881250950, 881250951, 881250952]

    items = ds.raw_item_ids
    assert as_dict(items, ds.item_features["title"]) == {
        "10": "Café Society",  # latin-1 decoded
        "20": "Untitled",
        "30": "Shadows (Cienie)",
    }
    # year from the title, else from the release date
    assert as_dict(items, ds.item_features["year"]) == {"10": "1995", "20": "1997", "30": "1988"}
    assert as_dict(items, ds.item_features["genres"]) == {
        "10": "Comedy Drama",
        "20": "Action",
        "30": "",
    }
    users = ds.raw_user_ids
    assert as_dict(users, ds.user_features["age"]) == {"1": "24", "2": "53"}
    assert as_dict(users, ds.user_features["gender"]) == {"1": "M", "2": "F"}
    assert as_dict(users, ds.user_features["occupation"]) == {"1": "technician", "2": "other"}
    assert as_dict(users, ds.user_features["zip_code"]) == {"1": "85711", "2": "94043"}


def test_movielens_1m_raw_files(tmp_path):
    directory = write_kind(tmp_path, "ml-1m")
    assert "Café".encode("latin-1") in (directory / "movies.dat").read_bytes()
    ds = load_movielens_1m(directory)
    assert ds.name == "ml-1m"
    assert_contiguous(ds)
    assert raw_pairs(ds) == [("1", "1193"), ("1", "661"), ("2", "1193")]
    assert ds.ratings is not None and ds.ratings.tolist() == [5, 3, 4]
    assert ds.timestamps.tolist() == [978300760, 978302109, 978298413]

    items = ds.raw_item_ids
    assert as_dict(items, ds.item_features["title"]) == {
        "1193": "One Flew Over the Cuckoo's Nest",
        "661": "Café au lait",
    }
    assert as_dict(items, ds.item_features["year"]) == {"1193": "1975", "661": "1993"}
    assert as_dict(items, ds.item_features["genres"]) == {
        "1193": "Drama",
        "661": "Animation Children's Musical",
    }
    users = ds.raw_user_ids
    assert as_dict(users, ds.user_features["occupation"]) == {
        "1": "K-12_student",
        "2": "programmer",
    }
    assert as_dict(users, ds.user_features["gender"]) == {"1": "F", "2": "M"}
    assert as_dict(users, ds.user_features["age"]) == {"1": "1", "2": "56"}


def test_movielens_1m_occupation_code_out_of_range(tmp_path):
    users = lines("1::F::1::10::48067", "2::M::56::21::70072")
    with pytest.raises(FedrecDataError, match="occupation code 21") as info:
        load_kind(tmp_path, "ml-1m", {"users.dat": users})
    assert "users.dat:2:" in str(info.value) and info.value.line == 2


# --- plain sequences -------------------------------------------------------------------------


def test_sequences_use_positions_as_time_and_keep_order(tmp_path):
    text = lines("5 30 10 20", "", "9\t10  40", "7 40")
    ds = load_kind(tmp_path, "sequences", {"seq.txt": text})
    assert ds.name == "seq"
    assert ds.ratings is None
    assert raw_pairs(ds) == [
        ("5", "30"),
        ("5", "10"),
        ("5", "20"),
        ("9", "10"),
        ("9", "40"),
        ("7", "40"),
    ]
    assert ds.timestamps.tolist() == [0, 1, 2, 0, 1, 0]
    assert ds.raw_user_ids.tolist() == ["5", "9", "7"]
    assert ds.raw_item_ids.tolist() == ["30", "10", "20", "40"]


def test_sequences_empty_file(tmp_path):
    with pytest.raises(FedrecDataError, match="no sequences"):
        load_kind(tmp_path, "sequences", {"seq.txt": "\n\n"})


# --- malformed input -------------------------------------------------------------------------

LATIN1_INTER = lines(INTER_HEADER, "1\t10\t5\t100").encode() + "2\tcafé\t3\t200\n".encode("latin-1")
LATIN1_ITEM = lines("item_id:token\tmovie_title:token_seq", "i1\tToy Story").encode() + (
    "i3\tCafé\n".encode("latin-1")
)

MALFORMED = [
    # missing column
    pytest.param(
        "recbole",
        {"toy.inter": lines("user_id:token\trating:float", "1\t5")},
        {},
        "toy.inter",
        1,
        ["missing column", "'item_id'"],
        id="missing-column-inter",
    ),
    pytest.param(
        "recbole",
        {"toy.item": lines("", "movie_title:token_seq", "Heat")},
        {},
        "toy.item",
        2,
        ["missing column", "'item_id'"],
        id="missing-column-item-after-blank-line",
    ),
    # non-integer id
    pytest.param(
        "ml-100k",
        {"u.data": lines("1\t10\t5\t881250949", "2\t20\t3\t881250950", "1\tx42\t4\t88125")},
        {},
        "u.data",
        3,
        ["'x42'", "item_id", "not an integer"],
        id="non-integer-id-u.data",
    ),
    pytest.param(
        "ml-1m",
        {"ratings.dat": lines("1::1193::5::978300760", "abc::661::3::978302109")},
        {},
        "ratings.dat",
        2,
        ["'abc'", "user_id", "not an integer"],
        id="non-integer-id-ratings.dat",
    ),
    pytest.param(
        "sequences",
        {"seq.txt": lines("1 10 20", "2 30 4O")},
        {},
        "seq.txt",
        2,
        ["'4O'", "item_id", "not an integer"],
        id="non-integer-item-sequences",
    ),
    pytest.param(
        "sequences",
        {"seq.txt": lines("1 10 20", "", "", "u4 30 40")},
        {},
        "seq.txt",
        4,
        ["'u4'", "user_id", "not an integer"],
        id="non-integer-user-sequences",
    ),
    # wrong separator
    pytest.param(
        "ml-100k",
        {"u.data": lines("1,10,5,881250949", "2,20,3,881250950")},
        {},
        "u.data",
        1,
        ["wrong separator", "comma", "expected tab"],
        id="wrong-separator-u.data",
    ),
    pytest.param(
        "recbole",
        {"toy.inter": lines(INTER_HEADER.replace("\t", ","), "1,10,5,100")},
        {},
        "toy.inter",
        1,
        ["wrong separator", "tab-separated"],
        id="wrong-separator-recbole-header",
    ),
    pytest.param(
        "recbole",
        {"toy.inter": lines(INTER_HEADER, "1\t10\t5\t100", "2,20,3,200")},
        {},
        "toy.inter",
        3,
        ["wrong separator", "comma", "expected tab"],
        id="wrong-separator-recbole-row",
    ),
    pytest.param(
        "ml-1m",
        {"users.dat": lines("1::F::1::10::48067", "2|M|56|12|70072")},
        {},
        "users.dat",
        2,
        ["wrong separator", "pipe", "expected '::'"],
        id="wrong-separator-users.dat",
    ),
    # truncated line
    pytest.param(
        "recbole",
        {"toy.inter": lines(INTER_HEADER, "1\t10\t5\t100", "", "2\t20\t3")},
        {},
        "toy.inter",
        4,
        ["truncated line", "expected 4", "found 3"],
        id="truncated-recbole-row",
    ),
    pytest.param(
        "ml-100k",
        {"u.data": lines("1\t10\t5\t881250949", "2\t20\t3")},
        {},
        "u.data",
        2,
        ["truncated line", "expected 4", "found 3"],
        id="truncated-u.data",
    ),
    pytest.param(
        "ml-100k",
        {"u.item": lines(ml100k_item(10, "Heat (1995)", ""), "20|Untitled|12-Mar-1997||")},
        {},
        "u.item",
        2,
        ["truncated line", "expected 24", "found 5"],
        id="truncated-u.item",
    ),
    pytest.param(
        "ml-100k",
        {"u.user": lines("1|24|M|technician|85711", "2|53|F")},
        {},
        "u.user",
        2,
        ["truncated line", "expected 5", "found 3"],
        id="truncated-u.user",
    ),
    pytest.param(
        "ml-1m",
        {"movies.dat": lines("1193::Heat (1995)::Drama", "661::Café au lait (1993)")},
        {},
        "movies.dat",
        2,
        ["truncated line", "expected 3", "found 2"],
        id="truncated-movies.dat",
    ),
    pytest.param(
        "sequences",
        {"seq.txt": lines("1 10 20", "", "7")},
        {},
        "seq.txt",
        3,
        ["truncated line", "found 1"],
        id="truncated-sequences",
    ),
    # wrong or unknown encoding
    pytest.param(
        "recbole",
        {"toy.inter": LATIN1_INTER},
        {},
        "toy.inter",
        3,
        ["cannot decode", r"b'\xe9'", "`encoding` option"],
        id="latin-1-inter-read-as-utf-8",
    ),
    pytest.param(
        "recbole",
        {"toy.item": LATIN1_ITEM},
        {},
        "toy.item",
        3,
        ["cannot decode", "`encoding` option"],
        id="latin-1-item-read-as-utf-8",
    ),
    pytest.param(
        "ml-1m",
        {},
        {"encoding": "utf-8"},
        "movies.dat",
        2,
        ["cannot decode", "`encoding` option"],
        id="latin-1-movies.dat-read-as-utf-8",
    ),
    pytest.param(
        "recbole",
        {},
        {"encoding": "no-such-codec"},
        "toy.inter",
        1,
        ["no-such-codec", "`encoding` option"],
        id="unknown-encoding",
    ),
]


@pytest.mark.parametrize(
    ("kind", "overrides", "kwargs", "file_name", "line", "fragments"), MALFORMED
)
def test_malformed_input_names_file_and_line(
    tmp_path, kind, overrides, kwargs, file_name, line, fragments
):
    with pytest.raises(FedrecDataError) as info:
        load_kind(tmp_path, kind, overrides, **kwargs)
    err = info.value
    message = str(err)
    assert f"{file_name}:{line}:" in message, message
    assert err.line == line
    assert err.path is not None and Path(err.path).name == file_name
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_recbole_float_column_that_is_not_a_number(tmp_path):
    inter = lines(INTER_HEADER, "1\t10\t5\t100", "1\t11\tfive\t200")
    with pytest.raises(FedrecDataError, match=r"'rating'.*'five'") as info:
        load_kind(tmp_path, "recbole", {"toy.inter": inter})
    assert "toy.inter:3:" in str(info.value) and info.value.line == 3


def test_recbole_token_timestamp_that_is_not_a_number(tmp_path):
    # A timestamp typed `token` is not checked while parsing, but it is converted to float.
    inter = lines("user_id:token\titem_id:token\ttimestamp:token", "1\t10\t100", "1\t11\tnoon")
    with pytest.raises(FedrecDataError) as info:
        load_kind(tmp_path, "recbole", {"toy.inter": inter})
    assert "toy.inter:3:" in str(info.value) and info.value.line == 3


def test_sequences_comma_separated_line_reports_wrong_separator(tmp_path):
    with pytest.raises(FedrecDataError) as info:
        load_kind(tmp_path, "sequences", {"seq.txt": lines("1 10 20", "2,30,40")})
    assert "seq.txt:2:" in str(info.value) and info.value.line == 2
    assert "separator" in str(info.value)


def test_nothing_is_returned_when_a_later_file_is_malformed(tmp_path):
    # u.data is fine but u.user is not: the whole load fails.
    with pytest.raises(FedrecDataError, match=r"u\.user:1:"):
        load_kind(tmp_path, "ml-100k", {"u.user": lines("x|24|M|technician|85711")})


# --- load_dataset ----------------------------------------------------------------------------


def test_load_dataset_without_a_path_asks_for_data_dir():
    with pytest.raises(FedrecDataError, match="--data-dir"):
        load_dataset(DataConfig(source="recbole"))


def test_load_dataset_with_a_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FedrecDataError, match="does not exist") as info:
        load_dataset(DataConfig(source="movielens-100k", path=str(missing)))
    assert info.value.path == str(missing)


def test_load_dataset_passes_name_and_encoding(tmp_path):
    directory = write_kind(tmp_path, "recbole")
    ds = load_dataset(DataConfig(source="recbole", path=str(tmp_path / "toy"), name="toy"))
    assert ds.num_interactions == 4
    renamed = directory.rename(tmp_path / "elsewhere")
    ds = load_dataset(DataConfig(source="recbole", path=str(renamed), name="toy"))
    assert ds.name == "toy" and ds.num_users == 2

    write_kind(tmp_path, "ml-1m")
    with pytest.raises(FedrecDataError, match=r"movies\.dat:2:.*`encoding`"):
        load_dataset(
            DataConfig(source="movielens-1m", path=str(tmp_path / "toy"), encoding="utf-8")
        )
