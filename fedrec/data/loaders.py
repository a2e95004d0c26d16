"""Loaders for the on-disk formats fedrec reads. Each returns one ``InteractionDataset``.

Every loader parses the whole file before building the data set, so a malformed row raises
``FedrecDataError`` (file and line) and nothing half-loaded is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.data.dataset import InteractionDataset, attach_table, remap_ids
from fedrec.data.textfile import parse_float, parse_int, read_lines, split_fields
from fedrec.errors import FedrecDataError

log = logging.getLogger(__name__)

# Canonical feature names used by audits and content encoders, whatever the source calls them.
_ITEM_ALIASES = {
    "movie_title": "title",
    "class": "genres",
    "genre": "genres",
    "release_year": "year",
}

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

# MovieLens-1M README: occupation codes.
ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad_student",
    "customer_service",
    "doctor/health_care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12_student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]


def _build(
    name: str,
    users: list[str],
    items: list[str],
    timestamps: list[float],
    ratings: list[float] | None,
    item_table: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
    user_table: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
) -> InteractionDataset:
    user_ids, user_vocab = remap_ids(np.asarray(users, dtype=object))
    item_ids, item_vocab = remap_ids(np.asarray(items, dtype=object))
    return InteractionDataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        timestamps=np.asarray(timestamps, dtype=np.float64),
        ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
        raw_user_ids=user_vocab,
        raw_item_ids=item_vocab,
        item_features={} if item_table is None else attach_table(item_vocab, *item_table),
        user_features={} if user_table is None else attach_table(user_vocab, *user_table),
    )


# --- RecBole atomic files ------------------------------------------------------------------


def _read_atomic(
    path: Path, encoding: str, required: tuple[str, ...], numeric: tuple[str, ...] = ()
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Read a RecBole atomic file: tab-separated with a typed ``name:type`` header.

    Columns typed ``float``, and those named in ``numeric`` whatever their type, must parse
    as numbers.
    """
    lines = read_lines(path, encoding)
    try:
        header_line, header = next(lines)
    except StopIteration:
        raise FedrecDataError(
            "empty file (expected a typed header such as user_id:token)", path, 1
        ) from None
    types: dict[str, str] = {}
    for raw_field in header.split("\t"):
        field_name, sep, field_type = raw_field.partition(":")
        if not sep or field_type not in {"token", "token_seq", "float", "float_seq"}:
            hint = (
                " (wrong separator? RecBole atomic files are tab-separated)"
                if "," in header
                else ""
            )
            raise FedrecDataError(
                f"header field {raw_field!r} is not name:type with type token, token_seq, "
                f"float or float_seq{hint}",
                path,
                header_line,
            )
        types[field_name] = field_type
    missing = [c for c in required if c not in types]
    if missing:
        raise FedrecDataError(
            f"missing column(s) {missing}; header has {list(types)}", path, header_line
        )
    columns: dict[str, list[str]] = {name: [] for name in types}
    names = list(types)
    for number, text in lines:
        if text == header:
            raise FedrecDataError(
                "the header line is repeated here (files joined by hand?): remove it", path, number
            )
        fields = split_fields(text, "\t", len(names), path, number)
        for column_name, value in zip(names, fields, strict=True):
            if types[column_name] == "float" or column_name in numeric:
                parse_float(value, column_name, path, number)
            columns[column_name].append(value)
    return types, columns


def load_recbole(
    directory: str | Path,
    name: str | None = None,
    encoding: str = "utf-8",
    user_field: str = "user_id",
    item_field: str = "item_id",
    rating_field: str = "rating",
    time_field: str = "timestamp",
) -> InteractionDataset:
    """Load ``<name>.inter`` (required), ``<name>.item`` and ``<name>.user`` (optional)."""
    directory = Path(directory)
    name = name or directory.name
    inter_path = directory / f"{name}.inter"
    if not inter_path.is_file():
        raise FedrecDataError(
            f"no {name}.inter here; set --data-dir to a RecBole data set folder", directory
        )
    _, inter = _read_atomic(
        inter_path, encoding, (user_field, item_field), numeric=(rating_field, time_field)
    )
    if time_field in inter:
        timestamps = [float(t) for t in inter[time_field]]
    else:
        log.warning("%s has no %r column: using file order as time", inter_path, time_field)
        timestamps = [float(i) for i in range(len(inter[user_field]))]
    ratings = [float(r) for r in inter[rating_field]] if rating_field in inter else None

    def side_table(
        suffix: str, key: str, aliases: dict[str, str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        path = directory / f"{name}.{suffix}"
        if not path.is_file():
            return None
        _, table = _read_atomic(path, encoding, (key,))
        ids = np.asarray(table.pop(key), dtype=object)
        return ids, {aliases.get(k, k): np.asarray(v, dtype=object) for k, v in table.items()}

    return _build(
        name,
        inter[user_field],
        inter[item_field],
        timestamps,
        ratings,
        side_table("item", item_field, _ITEM_ALIASES),
        side_table("user", user_field, {}),
    )


# --- GroupLens raw MovieLens ----------------------------------------------------------------


def _read_ratings(
    path: Path, sep: str | None, encoding: str
) -> tuple[list[str], list[str], list[float], list[float]]:
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[float] = []
    for number, text in read_lines(path, encoding):
        user, item, rating, stamp = split_fields(text, sep, 4, path, number)
        users.append(str(parse_int(user, "user_id", path, number)))
        items.append(str(parse_int(item, "item_id", path, number)))
        ratings.append(parse_float(rating, "rating", path, number))
        times.append(float(parse_int(stamp, "timestamp", path, number)))
    return users, items, ratings, times


def _title_and_year(title: str) -> tuple[str, str]:
    title = title.strip()
    if title.endswith(")") and title[-6:-5] == "(" and title[-5:-1].isdigit():
        return title[:-6].strip(), title[-5:-1]
    return title, ""


def _table(columns: dict[str, list[str]], key: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Side-table columns as ``(ids, {name: values})`` object arrays."""
    arrays = {name: np.asarray(values, dtype=object) for name, values in columns.items()}
    return arrays.pop(key), arrays


def _movielens_users(
    path: Path,
    sep: str,
    encoding: str,
    layout: tuple[str, ...],
    occupations: list[str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``u.user`` / ``users.dat``: fields named by ``layout``; ML-1M codes its occupations."""
    table: dict[str, list[str]] = {name: [] for name in layout}
    for number, text in read_lines(path, encoding):
        row = dict(zip(layout, split_fields(text, sep, len(layout), path, number), strict=True))
        row["user_id"] = str(parse_int(row["user_id"], "user_id", path, number))
        row["age"] = str(parse_int(row["age"], "age", path, number))
        if occupations is not None:
            code = parse_int(row["occupation"], "occupation", path, number)
            if not 0 <= code < len(occupations):
                raise FedrecDataError(
                    f"occupation code {code} outside 0..{len(occupations) - 1}", path, number
                )
            row["occupation"] = occupations[code]
        for name in layout:
            table[name].append(row[name])
    return _table(table, "user_id")


def load_movielens_100k(directory: str | Path, encoding: str = "latin-1") -> InteractionDataset:
    """GroupLens ``u.data``, ``u.item`` and ``u.user`` (as unpacked from ml-100k.zip)."""
    directory = Path(directory)
    users, items, ratings, times = _read_ratings(directory / "u.data", "\t", encoding)
    item_path = directory / "u.item"
    movies: dict[str, list[str]] = {"item_id": [], "title": [], "year": [], "genres": []}
    for number, text in read_lines(item_path, encoding):
        fields = split_fields(text, "|", 5 + len(ML100K_GENRES), item_path, number)
        movies["item_id"].append(str(parse_int(fields[0], "item_id", item_path, number)))
        title, year = _title_and_year(fields[1])
        movies["title"].append(title)
        movies["year"].append(year or fields[2][-4:])
        flags = fields[5:]
        movies["genres"].append(
            " ".join(g for g, f in zip(ML100K_GENRES, flags, strict=True) if f == "1")
        )
    layout = ("user_id", "age", "gender", "occupation", "zip_code")
    user_table = _movielens_users(directory / "u.user", "|", encoding, layout)
    return _build("ml-100k", users, items, times, ratings, _table(movies, "item_id"), user_table)


def load_movielens_1m(directory: str | Path, encoding: str = "latin-1") -> InteractionDataset:
    """GroupLens ``ratings.dat``, ``movies.dat`` and ``users.dat`` ('::'-separated, latin-1)."""
    directory = Path(directory)
    users, items, ratings, times = _read_ratings(directory / "ratings.dat", "::", encoding)
    movie_path = directory / "movies.dat"
    movies: dict[str, list[str]] = {"item_id": [], "title": [], "year": [], "genres": []}
    for number, text in read_lines(movie_path, encoding):
        movie_id, raw_title, genre_list = split_fields(text, "::", 3, movie_path, number)
        movies["item_id"].append(str(parse_int(movie_id, "item_id", movie_path, number)))
        title, year = _title_and_year(raw_title)
        movies["title"].append(title)
        movies["year"].append(year)
        movies["genres"].append(" ".join(genre_list.split("|")))
    layout = ("user_id", "gender", "age", "occupation", "zip_code")
    user_table = _movielens_users(directory / "users.dat", "::", encoding, layout, ML1M_OCCUPATIONS)
    return _build("ml-1m", users, items, times, ratings, _table(movies, "item_id"), user_table)


# --- Plain sequences (SASRec-family repositories) -------------------------------------------


def load_sequences(path: str | Path, encoding: str = "utf-8") -> InteractionDataset:
    """One line per user: ``user item item ...`` (integers, whitespace-separated, in time order).

    There are no timestamps in this format; the position in the sequence is used as time.
    """
    path = Path(path)
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    first_line: dict[str, int] = {}
    for number, text in read_lines(path, encoding):
        if "," in text or ";" in text:
            raise FedrecDataError(
                "wrong separator: ids must be separated by whitespace", path, number
            )
        fields = text.split()
        if len(fields) < 2:
            raise FedrecDataError(
                f"truncated line: expected a user id followed by at least one item id, found {len(fields)} field(s)",
                path,
                number,
            )
        user = str(parse_int(fields[0], "user_id", path, number))
        if user in first_line:
            raise FedrecDataError(
                f"user {user} has a second line (the first is line {first_line[user]}): one line "
                "per user, items in time order; join the lines",
                path,
                number,
            )
        first_line[user] = number
        for position, item in enumerate(fields[1:]):
            users.append(user)
            items.append(str(parse_int(item, "item_id", path, number)))
            times.append(float(position))
    if not users:
        raise FedrecDataError("no sequences in file", path)
    return _build(path.stem, users, items, times, None)


LOADERS: dict[str, Callable[..., InteractionDataset]] = {
    "recbole": load_recbole,
    "movielens-100k": load_movielens_100k,
    "movielens-1m": load_movielens_1m,
    "sequences": load_sequences,
}
