"""Settings and files that could only fail later, or silently, are refused where they are read
(issue 14)."""

from __future__ import annotations

import pytest

from fedrec.config import parse_config
from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.loaders import load_recbole, load_sequences
from fedrec.errors import FedrecConfigError, FedrecDataError
from fedrec.recommend import recommend

DP = {"noise_multiplier": 1.0}


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"federated": {"record_dp": True}}, "record_dp: expected a mapping"),
        ({"federated": {"central_dp": 5}}, "central_dp: expected a mapping"),
        ({"data": "synthetic"}, "data: expected a mapping"),
        ({"federated": {"local_learning_rate": float("nan")}}, "expected a finite number"),
        ({"train": {"learning_rate": float("inf")}}, "expected a finite number"),
        (
            {"federated": {"record_dp": DP, "record_epsilon_budget": 0.0}},
            "record_epsilon_budget must be > 0",
        ),
        (
            {"federated": {"record_dp": {"noise_multiplier": 0.0}, "record_epsilon_budget": 3.0}},
            "no client could ever train",
        ),
        ({"federated": {"max_update_norm": -1.0}}, "max_update_norm must be > 0"),
    ],
)
def test_a_setting_that_cannot_work_fails_at_load(section, match):
    with pytest.raises(FedrecConfigError, match=match):
        parse_config(section, "x.yaml")


def _recbole(tmp_path, rows: list[str]):
    folder = tmp_path / "toy"
    folder.mkdir()
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    (folder / "toy.inter").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return folder


def test_a_non_finite_timestamp_is_refused_with_its_line(tmp_path):
    folder = _recbole(tmp_path, ["1\t10\t4\t100", "1\t11\t3\tnan", "1\t12\t5\t300"])
    with pytest.raises(FedrecDataError, match=r"toy\.inter:3: column 'timestamp'.*finite"):
        load_recbole(folder)


def test_a_repeated_header_is_refused(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    folder = _recbole(tmp_path, ["1\t10\t4\t100", header, "2\t11\t3\t200"])
    with pytest.raises(FedrecDataError, match=r"toy\.inter:3: the header line is repeated"):
        load_recbole(folder)


def test_a_user_on_two_lines_of_a_sequences_file_is_refused(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12\n2 20 21 22\n1 13 14\n", encoding="utf-8")
    with pytest.raises(FedrecDataError, match=r"seq\.txt:3: user 1 has a second line"):
        load_sequences(path)


@pytest.mark.parametrize("k", [0, -5, 4])
def test_recommend_refuses_k_outside_the_catalogue(tmp_path, k):
    ItemCatalogue(("a", "b", "c"), {}).save(tmp_path / "catalogue.json")
    with pytest.raises(ValueError, match=r"--k must lie in 1\.\.3"):
        recommend(tmp_path, "u", k)
